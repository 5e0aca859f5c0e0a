"""Text methods: MD4, GenMD4 and GGM on a transformer, and the autoregressive reference."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from md4.diffusion import blocks, confidence, genmd4, glauber, guidance, masked, remasking
from md4.diffusion.categorical import adjust_logits, sample_categorical
from md4.diffusion.cross_entropy import log_prob
from md4.diffusion.schedules import Schedule, get_schedule
from md4.networks import DTYPES, apply_fn, partitioning
from md4.networks.matmul import cpu_has_amx
from md4.networks.transformer import Transformer

Array = jnp.ndarray

AUTO_PAD_VOCAB = (1024, 128)  # pad_vocab_to=-1: vocabularies above 1024 padded to 128s


def pad_multiple(config: ml_collections.ConfigDict, vocab_size: int) -> int:
  """The multiple the head's and embedding's vocabulary axes are padded to (1: none)."""
  multiple = config.model.pad_vocab_to
  if multiple == -1:
    threshold, multiple = AUTO_PAD_VOCAB
    return multiple if vocab_size > threshold else 1
  return max(multiple, 1)


@functools.cache
def resolve_matmul_dtype(matmul_dtype: str, dtype: str) -> str:
  """model.matmul_dtype with "auto" resolved (logged once): bfloat16 on the CPU backend of a CPU
  with AMX, where it makes the dense products ~3x faster (md4/networks/matmul.py), else ""
  (operands in the model's dtype)."""
  if matmul_dtype != "auto":
    return matmul_dtype
  amx = jax.default_backend() == "cpu" and cpu_has_amx()
  logging.info("model.matmul_dtype=auto -> %s", "bfloat16 (AMX CPU)" if amx else
               f"{dtype}, the model dtype ({jax.default_backend()} backend without AMX)")
  return "bfloat16" if amx else ""


def build_transformer(config: ml_collections.ConfigDict, vocab_size: int, *,
                      num_embeddings: int, causal: bool = False) -> Transformer:
  m = config.model
  multiple = pad_multiple(config, vocab_size)
  round_up = lambda n: multiple * math.ceil(n / multiple)
  matmul_dtype = resolve_matmul_dtype(m.matmul_dtype, m.dtype)
  return Transformer(vocab_size=vocab_size, num_embeddings=round_up(num_embeddings),
                     padded_vocab=round_up(vocab_size), width=m.width,
                     depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                     dropout=m.dropout, dtype=DTYPES[m.dtype],
                     matmul_dtype=DTYPES[matmul_dtype] if matmul_dtype else None,
                     time_conditioning=m.time_conditioning, causal=causal, remat=m.remat,
                     mlp=m.mlp, norm=m.norm, attention=m.attention,
                     local_mix=m.local_mix)


def network_fn(model: Transformer, params: Any, rng: Array | None, train: bool,
               padded: bool = True) -> Callable:
  """The `logits_fn(tokens, t, head_index=None, head_reduce=None)` callable of a transformer and
  its params. Its logits have the padded vocabulary (pad columns -inf) unless `padded` is False,
  for methods that combine logits with per-token arrays of size V."""
  net = apply_fn(model, params, rng, train)
  if padded or model.padded_vocab in (None, model.vocab_size):
    return lambda tokens, t, head_index=None, head_reduce=None: net(
        tokens, t, head_index=head_index, head_reduce=head_reduce)
  return lambda tokens, t, head_index=None: net(tokens, t, head_index=head_index)[
      ..., :model.vocab_size]


def diffusion_sampler(s: ml_collections.ConfigDict, schedule: Schedule, vocab_size: int,
                      w: Array | None = None) -> blocks.Sampler:
  """The sampler that config.sampling selects (method, its parameters, blocks), as
  sampler(logits_fn, rng, *, batch_size, seq_len, known, known_mask) -> (int[B, L], calls).

  w: GenMD4's exponents (its ancestral sampler; confidence order then uses equal shares).
  """
  common = dict(vocab_size=vocab_size, num_steps=s.num_steps, top_p=s.top_p or None,
                top_k=s.top_k or None, temperature=s.temperature, return_network_calls=True)
  if s.method == "remdm":
    sampler = functools.partial(remasking.sample, schedule=schedule, grid=s.grid,
                                sigma_schedule=s.remask_schedule, eta=s.eta,
                                alpha_on=s.loop_alpha_on, t_on=s.loop_t_on, t_off=s.loop_t_off,
                                **common)
  elif s.method == "confidence":
    sampler = functools.partial(
        confidence.sample, schedule=schedule if w is None else get_schedule("linear"),
        grid=s.grid, confidence=s.confidence, gumbel_temperature=s.gumbel_temperature,
        tokens_per_step=s.tokens_per_step, **common)
  elif w is not None:
    sampler = functools.partial(genmd4.sample, w=w, **common)
  else:
    sampler = functools.partial(masked.sample, schedule=schedule, grid=s.grid, **common)
  if s.block_size:
    return functools.partial(blocks.sample, sampler, vocab_size=vocab_size,
                             block_size=s.block_size, return_network_calls=True)
  return sampler


def guided_sample(s: ml_collections.ConfigDict, sampler: blocks.Sampler, logits_fn: Callable,
                  rng: Array, *, batch_size: int, seq_len: int, vocab_size: int, known=None,
                  known_mask=None) -> tuple[Array, Array]:
  """Runs `sampler`, with classifier-free guidance sampling.guidance where tokens are known (the
  unconditional branch sees them masked); returns (samples, network passes)."""
  passes = 1
  if s.guidance and known_mask is not None:
    uncond = guidance.without(logits_fn, jnp.asarray(known_mask), vocab_size)
    logits_fn, passes = guidance.guided(logits_fn, uncond, s.guidance), 2
  z, calls = sampler(logits_fn, rng, batch_size=batch_size, seq_len=seq_len, known=known,
                     known_mask=known_mask)
  return z, passes * calls


@dataclasses.dataclass
class MD4:
  """Masked diffusion (docs/methods.md §1) with a time-conditioned bidirectional transformer."""

  config: ml_collections.ConfigDict
  vocab_size: int
  # Metrics with these names are nats per sequence and become bits_per_token / ppl in reports.
  likelihood_metrics = ("nelbo",)

  def __post_init__(self):
    self.model = build_transformer(self.config, self.vocab_size,
                                   num_embeddings=self.vocab_size + 1)
    self.schedule = get_schedule(self.config.diffusion.schedule)

  def init(self, rng: Array) -> Any:
    seq_len = self.config.seq_len
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return self.model.init(rng, tokens, jnp.zeros((1,)))["params"]

  def _nelbo(self, params, tokens, rng, train):
    net_rng, diffusion_rng = jax.random.split(rng)
    # The masked-position head gathers within each device's rows (one group per batch shard).
    capacity, groups = None, partitioning.batch_shards(tokens.shape[0])
    if self.config.diffusion.head_fraction < 1.0:
      capacity = math.ceil(self.config.diffusion.head_fraction * tokens.size / groups)
    return masked.nelbo(network_fn(self.model, params, net_rng, train), tokens, diffusion_rng,
                        self.schedule, vocab_size=self.vocab_size,
                        num_steps=self.config.diffusion.num_steps, head_capacity=capacity,
                        head_groups=groups,
                        estimator=self.config.diffusion.train_estimator if train else "time")

  def loss(self, params, tokens, rng, train=True):
    nelbo = self._nelbo(params, tokens, rng, train)
    loss = nelbo.mean() / tokens.shape[1]  # nats per token
    return loss, {"loss": loss}

  def evaluate(self, params, tokens, rng):
    return {"nelbo": self._nelbo(params, tokens, rng, train=False)}

  def sample_with_calls(self, params, rng, batch_size, known=None, known_mask=None):
    """Samples with config.sampling's sampler: (int[B, L], network passes)."""
    s = self.config.sampling
    # Samplers draw from the V real columns (the Gumbel noise has the unpadded shape).
    sampler = diffusion_sampler(s, self.schedule, self.vocab_size)
    logits_fn = network_fn(self.model, params, None, False, padded=False)
    return guided_sample(s, sampler, logits_fn, rng, batch_size=batch_size,
                         seq_len=self.config.seq_len, vocab_size=self.vocab_size, known=known,
                         known_mask=known_mask)

  def sample(self, params, rng, batch_size, known=None, known_mask=None):
    return self.sample_with_calls(params, rng, batch_size, known, known_mask)[0]


@dataclasses.dataclass
class GenMD4(MD4):
  """State-dependent masking (docs/methods.md §2): params are {"net": ..., "w_raw": float[V]}.

  The exponents w = softplus(w_raw) live beside the network's parameters and are trained by the
  RLOO surrogate; the diffusion functions receive w explicitly.
  """

  def init(self, rng: Array) -> Any:
    return {"net": super().init(rng), "w_raw": genmd4.init_w_raw(self.vocab_size)}

  def _losses(self, params, tokens, rng, train):
    net_rng, diffusion_rng = jax.random.split(rng)
    w = jax.nn.softplus(params["w_raw"])
    logits_fn = network_fn(self.model, params["net"], net_rng, train, padded=False)
    return genmd4.loss(logits_fn, tokens, diffusion_rng, w, vocab_size=self.vocab_size), w

  def loss(self, params, tokens, rng, train=True):
    (surrogate, nelbo), w = self._losses(params, tokens, rng, train)
    seq_len = tokens.shape[1]
    metrics = {"loss": nelbo.mean() / seq_len, "surrogate": surrogate.mean() / seq_len,
               "w_min": w.min(), "w_mean": w.mean(), "w_max": w.max()}
    return surrogate.mean() / seq_len, metrics

  def evaluate(self, params, tokens, rng):
    (_, nelbo), _ = self._losses(params, tokens, rng, train=False)
    return {"nelbo": nelbo}

  def sample_with_calls(self, params, rng, batch_size, known=None, known_mask=None):
    s = self.config.sampling
    sampler = diffusion_sampler(s, self.schedule, self.vocab_size,
                                w=jax.nn.softplus(params["w_raw"]))
    logits_fn = network_fn(self.model, params["net"], None, False, padded=False)
    return guided_sample(s, sampler, logits_fn, rng, batch_size=batch_size,
                         seq_len=self.config.seq_len, vocab_size=self.vocab_size, known=known,
                         known_mask=known_mask)


def query_head_fn(model: Transformer, params: Any, rng: Array | None, train: bool,
                  num_steps: int, every_position: bool = False) -> Callable:
  """GGM adapter: logits_fn(x_in, t) -> float[B, V], the head only at the queried position
  (or float[B, L, V] at every position, for inputs with several queries).

  The queried position is the one holding the query id V (a per-row gather, local to each
  device); the step t in 0..T-1 reaches the network as the time t / T in [0, 1).
  """
  base = network_fn(model, params, rng, train, padded=False)

  def logits_fn(x_in: Array, t: Array) -> Array:
    time = t.astype(jnp.float32) / num_steps
    if every_position:
      return base(x_in, time)
    query = jnp.argmax(x_in == model.vocab_size, axis=1)  # int[B]
    return base(x_in, time, head_index=query)

  return logits_fn


@dataclasses.dataclass
class GGM:
  """Glauber Generative Model (docs/methods.md §3): a bank of V signal/noise classifiers.

  `noise_law` is u for ggm.noise=unigram (the training split's token frequencies, float[V]; the
  run's set-up reads or computes it); uniform noise needs none.
  """

  config: ml_collections.ConfigDict
  vocab_size: int
  noise_law: Any = None
  # Metrics with these names are nats per sequence and become bits_per_token / ppl in reports.
  likelihood_metrics = ("nelbo",)
  loss_is_likelihood = False  # the training loss is the classifiers' (no bits in train lines)

  def __post_init__(self):
    self.model = build_transformer(self.config, self.vocab_size,
                                   num_embeddings=self.vocab_size + 1)
    g = self.config.ggm
    if (g.noise == "unigram") != (self.noise_law is not None):
      raise ValueError(f"ggm.noise={g.noise} needs a noise_law exactly when unigram "
                       f"(got {'one' if self.noise_law is not None else 'none'})")
    self.process = glauber.GlauberProcess(self.config.seq_len, self.vocab_size, g.sweeps,
                                          self.config.diffusion.schedule, self.noise_law)

  def init(self, rng: Array) -> Any:
    tokens = jnp.zeros((1, self.config.seq_len), jnp.int32)
    return self.model.init(rng, tokens, jnp.zeros((1,)))["params"]

  def _logits_fn(self, params, rng, train):
    return query_head_fn(self.model, params, rng, train, self.process.num_steps)

  def _losses(self, params, tokens, rng, train):
    net_rng, diffusion_rng = jax.random.split(rng)
    return glauber.loss(self._logits_fn(params, net_rng, train), tokens, diffusion_rng,
                        self.process, kind=self.config.ggm.loss)

  def loss(self, params, tokens, rng, train=True):
    """The one-visit loss; with ggm.aux_queries = M > 0, the last ggm.aux_rows of the batch's
    rows supervise M visits each instead (one network call for the whole batch)."""
    g = self.config.ggm
    if not g.aux_queries:
      loss = self._losses(params, tokens, rng, train).mean()
      return loss, {"loss": loss}
    net_rng, diffusion_rng = jax.random.split(rng)
    batch_size = tokens.shape[0]
    aux = jnp.arange(batch_size) >= batch_size - round(g.aux_rows * batch_size)
    logits_fn = query_head_fn(self.model, params, net_rng, train, self.process.num_steps,
                              every_position=True)
    losses = glauber.loss(logits_fn, tokens, diffusion_rng, self.process, kind=g.loss,
                          queries=g.aux_queries, counts=jnp.where(aux, g.aux_queries, 1))
    loss = losses.mean()
    one_visit = jnp.sum(jnp.where(aux, 0.0, losses)) / jnp.maximum(jnp.sum(~aux), 1)
    return loss, {"loss": loss, "one_visit_loss": one_visit}

  def evaluate(self, params, tokens, rng):
    """Per sequence: the NELBO of the reverse chain (nats) and the classifier loss."""
    loss_rng, nelbo_rng = jax.random.split(rng)
    nelbo = glauber.nelbo(self._logits_fn(params, None, False), tokens, nelbo_rng, self.process)
    return {"nelbo": nelbo, "classifier_loss": self._losses(params, tokens, loss_rng, False)}

  def sample_with_calls(self, params, rng, batch_size, known=None, known_mask=None):
    """Heat-bath samples and the network calls they took: K per position not known in every
    row (T = K L without infilling)."""
    s = self.config.sampling
    samples = glauber.sample(self._logits_fn(params, None, False), rng, self.process,
                             batch_size=batch_size, known=known, known_mask=known_mask,
                             renoise_known=self.config.ggm.renoise_known,
                             temperature=s.temperature, top_p=s.top_p or None)
    free = self.config.seq_len
    if known_mask is not None:
      mask = jnp.asarray(known_mask, bool).reshape(-1, self.config.seq_len)
      free = jnp.sum(~jnp.all(mask, axis=0))
    return samples, self.config.ggm.sweeps * jnp.asarray(free)

  def sample(self, params, rng, batch_size, known=None, known_mask=None):
    return self.sample_with_calls(params, rng, batch_size, known, known_mask)[0]


@dataclasses.dataclass
class AR:
  """Autoregressive reference model (causal transformer), e.g. for generative perplexity.

  Input ids are the sequence shifted right behind a begin-of-sequence id V, so position i
  predicts token i from tokens < i; the negative log-likelihood is exact.
  """

  config: ml_collections.ConfigDict
  vocab_size: int
  likelihood_metrics = ("nll",)

  def __post_init__(self):
    self.model = build_transformer(self.config, self.vocab_size,
                                   num_embeddings=self.vocab_size + 1, causal=True)

  def init(self, rng: Array) -> Any:
    return self.model.init(rng, jnp.zeros((1, self.config.seq_len), jnp.int32))["params"]

  def _inputs(self, tokens: Array) -> Array:
    bos = jnp.full((tokens.shape[0], 1), self.vocab_size, tokens.dtype)
    return jnp.concatenate([bos, tokens[:, :-1]], axis=1)

  def nll(self, params, tokens, rng=None, train=False) -> Array:
    """Negative log-likelihood in nats per sequence: float[B]."""
    logits = network_fn(self.model, params, rng, train)(self._inputs(tokens), None)
    return -log_prob(logits, tokens).sum(axis=1)

  def loss(self, params, tokens, rng, train=True):
    loss = self.nll(params, tokens, rng, train).mean() / tokens.shape[1]
    return loss, {"loss": loss}

  def evaluate(self, params, tokens, rng):
    return {"nll": self.nll(params, tokens)}

  def sample(self, params, rng, batch_size, known=None, known_mask=None):
    """Left to right, one full forward pass per position (no KV cache: a reference model)."""
    s, seq_len = self.config.sampling, self.config.seq_len
    logits_fn = network_fn(self.model, params, None, False, padded=False)
    tokens = masked.initial_state(batch_size, seq_len, 0, known, known_mask)
    fixed = jnp.zeros(tokens.shape, bool) if known_mask is None else jnp.broadcast_to(
        known_mask, tokens.shape)

    def step(i, tokens):
      logits = adjust_logits(logits_fn(self._inputs(tokens), None)[:, i],
                             temperature=s.temperature, top_p=s.top_p or None)
      drawn = sample_categorical(jax.random.fold_in(rng, i), logits)
      return tokens.at[:, i].set(jnp.where(fixed[:, i], tokens[:, i], drawn))

    return jax.lax.fori_loop(0, seq_len, step, tokens)
