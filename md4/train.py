"""The training loop, read top to bottom: data -> mesh -> state -> (resume) -> steps -> eval,
samples and checkpoints. `Run` (the set-up) and `load_for_inference` also serve the `eval` and
`sample` modes of md4/inference.py.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from md4 import checkpointing, config_lib, evaluate, infill, methods, muon, sharding
from md4.data import images
from md4.data.pipeline import create_datasets
from md4.data.tokenizers import BPETokenizer
from md4.metric_writers import MetricWriter
from md4.networks import DTYPES

# Steps dispatched ahead of the host at most. Unbounded, XLA:CPU's in-process collectives
# deadlock: with 2 simulated devices, a few hundred queued steps starve its all-reduce rendezvous.
MAX_STEPS_IN_FLIGHT = 2


TOKENIZER_FILE = "tokenizer.json"  # a run's learned tokenizer (data.tokenizer=bpe), in its workdir


class NonFiniteError(RuntimeError):
  """The loss or gradient became NaN/inf; the run stops before writing a checkpoint."""


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int):
  """AdamW (or Muon on the blocks' matrices) with linear warm-up, then cosine, linear or no
  decay (to min_lr_ratio * lr), and global-norm clipping."""
  o = config.optimizer
  decay_steps = max(num_steps, o.warmup_steps + 1)
  if o.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, decay_steps,
                                            end_value=o.lr * o.min_lr_ratio)
  else:
    end = o.lr * o.min_lr_ratio if o.schedule == "linear" else o.lr
    lr = optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps),
                               optax.linear_schedule(o.lr, end, decay_steps - o.warmup_steps)],
                              [o.warmup_steps])
  decay_mask = functools.partial(jax.tree.map, lambda p: p.ndim >= 2)  # no decay on norms, biases
  if o.name == "muon":
    muon_lr = lambda step: lr(step) * (o.muon_lr / o.lr)  # the same warm-up and decay
    opt = muon.muon(muon_lr, lr, _block_matrices, beta=o.muon_beta, b1=o.b1, b2=o.b2,
                    weight_decay=o.weight_decay, decay_mask=decay_mask, ns_steps=o.muon_ns_steps,
                    operand_dtype=DTYPES[o.muon_matmul_dtype] if o.muon_matmul_dtype else None)
  else:
    opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=1e-8, weight_decay=o.weight_decay,
                      mask=decay_mask)
  tx = optax.chain(optax.clip_by_global_norm(o.grad_clip) if o.grad_clip else optax.identity(),
                   opt)
  return tx, lr


def _block_matrices(params: Any) -> Any:
  """Muon's share: the 2-D kernels inside transformer blocks, except the time modulation."""
  def is_matrix(path, p):
    names = [str(getattr(k, "key", "")) for k in path]
    return (p.ndim == 2 and any(n.startswith("block_") for n in names)
            and "modulation" not in names)
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def ema_decay(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """EMA decay, warmed up as min(decay, (1 + step) / (10 + step)) when ema_warmup is set."""
  decay = jnp.asarray(config.training.ema_decay, jnp.float32)
  if config.training.ema_warmup:
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


def train_step(state: dict, batch: dict, *, method, tx, lr, config: ml_collections.ConfigDict,
               rng: jax.Array, data_key: str = "tokens") -> tuple[dict, dict]:
  """One optimizer step (with optional gradient accumulation); skips non-finite updates.

  The step's randomness is fold_in(rng, step), so a resumed run draws the same keys.
  """
  step = state["step"]
  rng = jax.random.fold_in(rng, step)
  tokens = batch[data_key]  # int[B, L] token ids, or int[B, H, W, C] image counts
  accum = config.training.grad_accum
  grad_fn = jax.value_and_grad(method.loss, has_aux=True)

  micro_rngs = jax.random.split(rng, accum)
  if accum == 1:
    # No loop: a gradient taken inside a loop body (even of length 1) keeps convolution layouts
    # that XLA:CPU runs on a naive emitter, ~10x slower (jax-ml/jax#12868).
    (_, metrics), grads = grad_fn(state["params"], tokens, micro_rngs[0])
  else:
    def micro(carry, xs):
      micro_tokens, micro_rng = xs
      (_, metrics), grads = grad_fn(state["params"], micro_tokens, micro_rng)
      return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    micro_batches = tokens.reshape(accum, -1, *tokens.shape[1:])
    (_, metric_shapes), grad_shapes = jax.eval_shape(grad_fn, state["params"], micro_batches[0],
                                                     rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grad_shapes, metric_shapes))
    # Unrolled on CPU, for the convolution layouts above; a loop elsewhere, to bound memory.
    unroll = jax.default_backend() == "cpu"
    (grads, metrics), _ = jax.lax.scan(micro, zeros, (micro_batches, micro_rngs), unroll=unroll)
    grads, metrics = jax.tree.map(lambda g: g / accum, (grads, metrics))

  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  decay = ema_decay(config, step)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
  new_state = {"step": step + 1, "params": params, "opt_state": opt_state, "ema": ema}
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                           {**state, "step": step + 1})
  metrics = {**metrics, "grad_norm": grad_norm, "lr": lr(step),
             "nonfinite": 1 - finite.astype(jnp.int32)}
  return new_state, metrics


def init_state(method, tx, rng: jax.Array) -> dict:
  """Params, optimizer moments, EMA params and the step counter."""
  params = method.init(rng)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "ema": params}


class Run:
  """Everything a mode needs: config, mesh, data, method, optimizer, jitted steps.

  With `with_data=False` no data is read (`data` is None): the model, its state's shapes and the
  checkpoint depend on the config alone.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, with_data: bool = True):
    config_lib.validate(config)
    self.config, self.workdir = config, workdir
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    self.is_image = config.data.dataset in images.IMAGE_DATASETS
    self.data_key = "images" if self.is_image else "tokens"
    common = dict(batch_size=config.training.batch_size, seed=config.seed,
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  eval_batch_size=config.eval.batch_size)
    self.data = None
    if with_data and self.is_image:
      self.data = images.create_image_datasets(config.data, **common)
    elif with_data:
      # A learned (bpe) tokenizer is kept with the run, so that eval and sample modes (and
      # zero-shot evaluation on other data) encode text as training did.
      self.data = create_datasets(config.data, seq_len=config.seq_len, **common,
                                  vocab_size=config.vocab_size,
                                  tokenizer_file=os.path.join(workdir, TOKENIZER_FILE))
    vocab_size = config_lib.check_data(config, self.data) if with_data else config.vocab_size
    self.method = methods.create(config, vocab_size)
    self.tx, self.lr = make_optimizer(config, config.training.num_steps)
    # Independent streams for init, training steps, evaluation and sampling.
    self.init_rng, self.train_rng, self.eval_rng, self.sample_rng = jax.random.split(
        jax.random.key(config.seed), 4)
    self.checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                                   max_to_keep=config.training.keep_checkpoints)

    # The train state: params, optimizer moments, EMA params and the step. Shapes first, then the
    # shardings (FSDP where large), then the real thing materialised directly in that layout.
    init = functools.partial(init_state, self.method, self.tx)
    abstract = jax.eval_shape(init, self.init_rng)
    self.state_sharding = sharding.state_shardings(self.mesh, abstract)
    self._init_state = jax.jit(init, out_shardings=self.state_sharding)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
        self.state_sharding)
    step_fn = functools.partial(train_step, method=self.method, tx=self.tx, lr=self.lr,
                                config=config, rng=self.train_rng, data_key=self.data_key)
    self.train_step = jax.jit(step_fn, donate_argnums=0,
                              out_shardings=(self.state_sharding, None))
    # Per-example eval outputs come back replicated so that every process can read them; text
    # examples also report their length in characters (for bits per character).
    lengths = getattr(getattr(self.data, "tokenizer", None), "token_lengths", None)
    def eval_step(params, batch, rng):
      out = self.method.evaluate(params, batch[self.data_key], rng)
      if lengths is not None:
        out[evaluate.CHARS] = jnp.asarray(lengths)[batch[self.data_key]].sum(-1)
      return out
    self.eval_step = jax.jit(eval_step, out_shardings=sharding.replicated(self.mesh))
    self.sample_step = jax.jit(self.method.sample, static_argnums=2)

  def restore_or_init(self) -> tuple[dict, int]:
    """The newest readable checkpoint of the workdir, or a fresh state at step 0."""
    restored = self.checkpointer.restore_latest(self.abstract_state)
    if restored is None:
      return self._init_state(self.init_rng), 0
    step, state, data_state = restored
    if self.data is not None:
      self.data.train.set_state(data_state)
    logging.info("resumed from the checkpoint at step %d", step)
    return state, step

  def evaluate(self, params: Any, *, num_batches: int) -> dict[str, float]:
    """Method metrics on held-out data (fixed batches and keys; means per example)."""
    return evaluate.held_out(self.eval_step, params, self.data.eval_batches(), self.mesh,
                             rng=self.eval_rng, num_batches=num_batches,
                             likelihood_metrics=self.method.likelihood_metrics,
                             time_samples=self.config.eval.time_samples)

  def draw_samples(self, params: Any, step: int, *, known=None, known_mask=None,
                   name: str | None = None, nll_fn: Callable | None = None) -> dict[str, float]:
    """Samples from `params`, written to samples/<name or step_N>.txt (.png for images);
    returns sample metrics, with the generative perplexity under `nll_fn` when given.

    Image infilling (`known` int[B, H, W, C]) writes each masked input beside its completion.
    """
    num = self.config.sampling.num_samples
    rng = jax.random.fold_in(self.sample_rng, step)
    samples = np.asarray(self.sample_step(params, rng, num, known, known_mask))
    path = os.path.join(self.workdir, "samples", name or f"step_{step}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      if self.is_image:
        shown = samples if known_mask is None else infill.side_by_side(
            known, known_mask, samples, fill=self.data.max_count // 2)
        images.save_image_grid(shown, path + ".png", self.data.max_count)
      else:
        with open(path + ".txt", "w") as f:
          f.write("\n\n".join(self.data.tokenizer.decode(row) for row in samples) + "\n")
    if self.is_image:
      return {"mean_intensity": float(samples.mean() / self.data.max_count)}
    report = {"unigram_entropy": float(evaluate.unigram_entropy(samples).mean())}
    if nll_fn is not None:
      report.update(evaluate.generative_perplexity(samples, nll_fn))
    return report


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the newest checkpoint in workdir) and returns the final state."""
  run = Run(config, workdir)
  tokenizer = getattr(run.data, "tokenizer", None)
  reference = load_reference(config, tokenizer) if config.sampling.every else None
  t = config.training
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  config_lib.save(config, workdir)
  state, start = run.restore_or_init()
  logging.info("parameters: %s", f"{evaluate.count_params(state['params']):,}")
  batch_shape = next(iter(run.data.eval_batches()))[run.data_key].shape[1:]
  tokens_per_step = t.batch_size * int(np.prod(batch_shape))  # tokens, or pixel channels
  chars_per_token = run.data.info.get("train_chars_per_token")
  pending, tick = [], time.perf_counter()

  for step in range(start + 1, t.num_steps + 1):
    batch = sharding.global_batch(run.mesh, next(run.data.train))
    state, metrics = run.train_step(state, batch)
    pending.append(metrics)
    if len(pending) > MAX_STEPS_IN_FLIGHT:
      jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1])

    if step % t.log_every == 0 or step % t.checkpoint_every == 0 or step == t.num_steps:
      # Fetching the metrics is the only host sync; it also guards every checkpoint.
      window = jax.device_get(pending)
      elapsed, tick, pending = time.perf_counter() - tick, time.perf_counter(), []
      logged = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
      if any(m["nonfinite"] for m in window):
        writer.write(step, "train", logged)
        last = run.checkpointer.latest_step()
        raise NonFiniteError(f"non-finite loss or gradient at step {step} (lr {logged['lr']:.3g}); "
                             f"stopped without saving; last good checkpoint: step {last}")
      del logged["nonfinite"]
      logged["tokens_per_s"] = tokens_per_step * len(window) / elapsed
      if run.method.likelihood_metrics:
        logged.update(evaluate.likelihood_report(logged["loss"]))
        if chars_per_token:  # the training split's mean, not this window's own count
          logged["bits_per_char"] = logged["bits_per_token"] / chars_per_token
      writer.write(step, "train", logged)

    if step % t.eval_every == 0 or step == t.num_steps:
      for weights in config.eval.weights:
        report = run.evaluate(state[weights], num_batches=config.eval.num_batches)
        writer.write(step, "eval", {**report, "weights": weights})

    if config.sampling.every and (step % config.sampling.every == 0 or step == t.num_steps):
      report = run.draw_samples(state["ema"], step, nll_fn=reference)
      writer.write(step, "sample", {**report, "weights": "ema"})

    if step % t.checkpoint_every == 0 or step == t.num_steps:
      run.checkpointer.save(step, state, run.data.train.get_state())

  run.checkpointer.close()
  writer.close()
  return state


def load_for_inference(config: ml_collections.ConfigDict, workdir: str, *,
                       with_data: bool = True) -> tuple[Run, dict, int]:
  """(run, state, step) of the newest readable checkpoint in workdir.

  The restore depends on the config's model only, so `config.data` may name any dataset with
  the same vocabulary (zero-shot evaluation); `with_data=False` reads no data at all.
  """
  run = Run(config, workdir, with_data=with_data)
  restored = run.checkpointer.restore_latest(run.abstract_state)
  if restored is None:
    raise checkpointing.CheckpointError(f"no checkpoint in {run.checkpointer.directory}; "
                                        "train first (--mode=train)")
  step, state, _ = restored
  return run, state, step


def check_reference_tokenizer(config: ml_collections.ConfigDict, tokenizer: Any) -> None:
  """A learned (bpe) `tokenizer` must be the one the reference AR run was trained with."""
  workdir = config.eval.reference_workdir
  if not workdir or getattr(tokenizer, "merges", None) is None:
    return
  saved = config_lib.load(workdir).data.get("tokenizer_path")
  path = saved or os.path.join(workdir, TOKENIZER_FILE)
  if not os.path.isfile(path) or BPETokenizer.load(path).merges != tokenizer.merges:
    raise config_lib.ConfigError(f"eval.reference_workdir {workdir}: its BPE tokenizer ({path}) "
                                 "is not this run's")


def load_reference(config: ml_collections.ConfigDict, tokenizer: Any = None) -> Callable | None:
  """nll_fn(tokens int[B, L]) -> nats float[B] of the AR run in config.eval.reference_workdir.

  The reference is built from its own saved config.json and scored with its EMA weights; None
  when no reference is configured. Vocabulary and seq_len (and a learned tokenizer's merges
  against `tokenizer`'s) are checked before anything is loaded.
  """
  workdir = config.eval.reference_workdir
  if not workdir:
    return None
  reference = config_lib.load(workdir)
  config_lib.check_reference(config, reference)
  check_reference_tokenizer(config, tokenizer)
  run, state, step = load_for_inference(reference, workdir, with_data=False)
  logging.info("reference model for generative perplexity: %s (step %d)", workdir, step)
  nll, params = jax.jit(run.method.nll), state["ema"]
  return lambda tokens: nll(params, tokens)
