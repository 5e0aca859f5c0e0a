"""GGM: the Glauber Generative Model (docs/methods.md §3). Pure functions of a `logits_fn`.

Forward process: steps t = 0..T-1 with T = K * L (K sweeps); step t visits position
i_t = t mod L and, with probability pi_t, leaves its token alone ("signal"), else replaces it by
a token drawn from the noise law u ("noise"; u uniform or, e.g., the data's unigram frequencies).
Given the clean x, positions stay independent, so X_t is drawn in closed form. The reverse step
resamples position i_t from q_t(a | x_{-i}), obtained from a bank of V binary classifiers "was
the token a seen at i_t signal?":

    q_t(a | x_{-i}) = (Pi_t(a) / pi_t) * p_t / (1 - p_t),   Pi_t(a) = (1 - pi_t) u(a),

so with logits l(a) = logit(p_t(a, x_{-i})) the reverse kernel is softmax(l + log u). `nelbo`
bounds -log p(x) with the exact time reversal of the chain, built from the same logits.

Network contract: `logits_fn(x_in, t)` with x_in: int[B, L] in 0..V, where position i_t holds
the query id V, and t: int[B]. It returns either float[B, L, V] (the row i_t is read) or
float[B, V] (the row of the queried position only, so the head can be computed at one position).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from md4.diffusion.categorical import adjust_logits, sample_categorical
from md4.diffusion.schedules import Schedule, get_schedule

Array = jnp.ndarray
LogitsFn = Callable[[Array, Array], Array]

# Keep probabilities are clipped to this range so that both outcomes of a visit are possible.
PI_MIN, PI_MAX = 1e-12, 1.0 - 1e-6
LOSS_KINDS = ("soft", "hard", "ce")
# Noise laws u of the configs: uniform, or the training split's token frequencies (given as u).
NOISE_LAWS = ("uniform", "unigram")


@dataclasses.dataclass(frozen=True)
class GlauberProcess:
  """Time-dependent Glauber noising of int[L] sequences over V tokens in K sweeps.

  `schedule` is a survival curve alpha (a Schedule or a name for `get_schedule`); the m-th visit
  of a position keeps its token with probability pi = alpha(m / K) / alpha((m - 1) / K).
  `noise_law` is the law u of a noise token: float[V], positive, summing to 1 (None: uniform).
  """

  seq_len: int
  vocab_size: int
  sweeps: int
  schedule: Schedule | str
  noise_law: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

  def __post_init__(self):
    if isinstance(self.schedule, str):
      object.__setattr__(self, "schedule", get_schedule(self.schedule))
    if self.seq_len < 1 or self.vocab_size < 2 or self.sweeps < 1:
      raise ValueError(f"need seq_len >= 1, vocab_size >= 2, sweeps >= 1; got {self}")
    if self.noise_law is not None:
      u = np.asarray(self.noise_law, np.float64)
      if u.shape != (self.vocab_size,) or not np.all(u > 0) or abs(u.sum() - 1.0) > 1e-4:
        raise ValueError(f"noise_law must be {self.vocab_size} positive probabilities summing "
                         f"to 1; got shape {u.shape}, min {u.min():.3g}, sum {u.sum():.6g}")
      object.__setattr__(self, "noise_law", (u / u.sum()).astype(np.float32))

  @property
  def uniform_noise(self) -> bool:
    return self.noise_law is None

  def noise_dist(self) -> Array:
    """u: float32[V], the law of a noise token."""
    if self.noise_law is None:
      return jnp.full((self.vocab_size,), 1.0 / self.vocab_size, jnp.float32)
    return jnp.asarray(self.noise_law)

  def log_noise_dist(self) -> Array:
    """log u: float32[V]."""
    if self.noise_law is None:
      return jnp.full((self.vocab_size,), -np.log(self.vocab_size), jnp.float32)
    return jnp.log(jnp.asarray(self.noise_law))

  def draw_noise(self, rng: Array, shape: tuple[int, ...], dtype=jnp.int32) -> Array:
    """Noise tokens ~ u, int[shape] (inverse CDF: O(log V) per token, no [..., V] array)."""
    if self.noise_law is None:
      return jax.random.randint(rng, shape, 0, self.vocab_size, dtype=dtype)
    cdf = jnp.cumsum(jnp.asarray(self.noise_law, jnp.float32))
    tokens = jnp.searchsorted(cdf, jax.random.uniform(rng, shape) * cdf[-1], side="right")
    return jnp.minimum(tokens, self.vocab_size - 1).astype(dtype)

  @property
  def num_steps(self) -> int:
    """T = K * L."""
    return self.sweeps * self.seq_len

  @property
  def query_id(self) -> int:
    """The input id that marks the queried position (= V)."""
    return self.vocab_size

  def _visit_keep_probs(self) -> Array:
    """pi for visits m = 1..K: float[K] (the ratio itself, accurate when pi is small)."""
    m = jnp.arange(1, self.sweeps + 1, dtype=jnp.float32)
    alpha = self.schedule.alpha
    return jnp.clip(alpha(m / self.sweeps) / alpha((m - 1) / self.sweeps), PI_MIN, PI_MAX)

  def _visit_noise_probs(self) -> Array:
    """1 - pi for visits m = 1..K: float[K], as (alpha(s) - alpha(t)) / alpha(s), s = (m-1)/K,
    t = m/K, with alpha(s) - alpha(t) = (1 - alpha(t)) - (1 - alpha(s)) from the closed-form
    1 - alpha (no cancellation when pi is close to 1)."""
    m = jnp.arange(1, self.sweeps + 1, dtype=jnp.float32)
    s, t = (m - 1) / self.sweeps, m / self.sweeps
    one_minus_alpha = self.schedule.one_minus_alpha
    noise = (one_minus_alpha(t) - one_minus_alpha(s)) / self.schedule.alpha(s)
    return jnp.clip(noise, 1.0 - PI_MAX, 1.0 - PI_MIN)

  def position(self, t: Array) -> Array:
    """Visited position i_t = t mod L."""
    return jnp.asarray(t) % self.seq_len

  def keep_prob(self, t: Array) -> Array:
    """pi_t = Pi_t(phi) = alpha(m / K) / alpha((m - 1) / K), m = t // L + 1: float, in (0, 1)."""
    return self._visit_keep_probs()[jnp.asarray(t) // self.seq_len]

  def noise_mass(self, t: Array) -> Array:
    """1 - pi_t, the probability that the visit at step t writes a noise token: float."""
    return self._visit_noise_probs()[jnp.asarray(t) // self.seq_len]

  def noise_prob(self, t: Array) -> Array:
    """Pi_t(a) = (1 - pi_t) u(a), the probability that the visit writes noise token a:
    float[..., V] for t: int[...]."""
    return self.noise_mass(t)[..., None] * self.noise_dist()

  def pre_visit_law(self, clean: Array, t: Array) -> Array:
    """r_a = kappa 1[a = x_i] + (1 - kappa) u(a), the law of X_t^{i_t} given x_i = `clean`
    (kappa = kappa_c, c = t // L completed visits of i_t): float[..., V] for clean, t: int[...]."""
    visits = jnp.asarray(t) // self.seq_len
    kappa = self.survival(visits)[..., None]
    return (kappa * jax.nn.one_hot(clean, self.vocab_size)
            + self.survival_complement(visits)[..., None] * self.noise_dist())

  def survival(self, c: Array) -> Array:
    """kappa_c = prod of the first c keep probabilities = alpha(c / K) / alpha(0): float."""
    kappa = jnp.concatenate([jnp.ones((1,)), jnp.cumprod(self._visit_keep_probs())])
    return kappa[jnp.asarray(c)]

  def survival_complement(self, c: Array) -> Array:
    """1 - kappa_c = (alpha(0) - alpha(c / K)) / alpha(0), with alpha(0) - alpha(c / K) taken as
    (1 - alpha(c / K)) - (1 - alpha(0)) from the closed-form 1 - alpha: float in [0, 1], accurate
    where kappa is close to 1 (it is the schedule's value: visit clipping at PI_MAX, active only
    where 1 - pi < 1e-6, is not reflected)."""
    one_minus_alpha = self.schedule.one_minus_alpha
    start = jnp.zeros(())
    c = jnp.asarray(c)
    lost = one_minus_alpha(c.astype(jnp.float32) / self.sweeps) - one_minus_alpha(start)
    return jnp.clip(lost / self.schedule.alpha(start), 0.0, 1.0)

  def completed_visits(self, t: Array) -> Array:
    """c_j(t): number of visits of position j among steps 0..t-1: int[..., L] for t: int[...]."""
    j = jnp.arange(self.seq_len)
    return (jnp.asarray(t)[..., None] - j + self.seq_len - 1) // self.seq_len

  def noise_to(self, x: Array, t: Array, rng: Array) -> Array:
    """Draws X_t | X_0 = x in closed form: int[B, L] for x: int[B, L], t: int[B] (0..T).

    Position j keeps x_j with probability kappa_{c_j(t)}, else holds a noise token ~ u.
    """
    keep_rng, token_rng = jax.random.split(rng)
    kappa = self.survival(self.completed_visits(jnp.broadcast_to(t, x.shape[:-1])))
    keep = jax.random.uniform(keep_rng, x.shape) < kappa
    noise = self.draw_noise(token_rng, x.shape, x.dtype)
    return jnp.where(keep, x, noise)

  def prior_kl(self, x: Array) -> Array:
    """KL(q(X_T | x) || u^L) in nats: float[B] for x: int[B, L]; position j of X_T is
    kappa_K 1[. = x_j] + (1 - kappa_K) u."""
    kappa = self.survival(self.sweeps)
    u_x = self.noise_dist()[x]
    at_x = kappa + (1.0 - kappa) * u_x
    others = jax.scipy.special.xlogy((1.0 - kappa) * (1.0 - u_x), 1.0 - kappa)
    return jnp.sum(at_x * (jnp.log(at_x) - jnp.log(u_x)) + others, axis=-1)


def _query_row(logits: Array, i: Array) -> Array:
  """The float32 logits of the queried position: float[B, V] from [B, L, V] or [B, V]."""
  logits = logits.astype(jnp.float32)
  if logits.ndim == 3:
    return jnp.take_along_axis(logits, jnp.broadcast_to(i, logits.shape[:1])[:, None, None],
                               axis=1)[:, 0]
  if logits.ndim != 2:
    raise ValueError(f"logits must be [B, L, V] or [B, V]; got shape {logits.shape}")
  return logits


def stratified_steps(rng: Array, batch_size: int, num_steps: int) -> Array:
  """Steps t_b = floor(T * ((u + b / B) mod 1)) with one shared u ~ U[0, 1): int[B] in 0..T-1."""
  u = jax.random.uniform(rng, ())
  frac = jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)
  return jnp.minimum(jnp.floor(frac * num_steps).astype(jnp.int32), num_steps - 1)


def _queried_logits(logits_fn: LogitsFn, context: Array, t: Array, process: GlauberProcess
                    ) -> Array:
  """The network's float32 logits at i_t for the sequence `context` with position i_t replaced
  by the query id: float[B, V] (one call; context int[B, L], t int[B])."""
  i = process.position(t)
  at_i = jnp.arange(context.shape[1]) == i[:, None]  # [B, L]
  x_in = jnp.where(at_i, process.query_id, context)
  return _query_row(logits_fn(x_in, t), i)


def loss(logits_fn: LogitsFn, x: Array, rng: Array, process: GlauberProcess, *,
         kind: str = "soft", queries: int = 1, counts: Array | None = None) -> Array:
  """Classifier loss of `queries` visits per example, nats per visit: float[B] (unbiased).

  Each row draws a step t (stratified over the batch), X_t | x in closed form, and supervises
  the visits of steps t..t+Q-1 (Q = queries <= L, distinct positions i = i_{t+k}, none visited
  between t and its own step, so X_t^i is its pre-visit state); the network sees X_t with those
  Q positions replaced by the query id V. Q = 1 is GGM's objective, the one whose minimiser the
  sampler uses; Q > 1 is an auxiliary task (inputs with several query ids, never met by the
  sampler) that supervises Q positions per network pass. `counts` (int[B] in 1..Q) gives row b
  only its first counts[b] visits, t then drawn in 0..T-counts[b], so one batch can mix both.
  Q > 1 or `counts` needs logits_fn -> [B, L, V].

  kind (per visit at position i, step s):
    "hard": simulate the visit (signal w.p. pi_s, else a noise token ~ u), observed token b,
      binary cross-entropy of l(b) against y = 1[signal].
    "soft": its expectation over the visit and over X_t^i given x (same minimiser),
      -sum_a [pi_s r_a log sigmoid(l(a)) + Pi_s(a) log sigmoid(-l(a))], with
      r_a = kappa 1[a = x_i] + (1 - kappa) u(a) the pre-visit law of position i.
    "ce": cross-entropy of softmax(l + log u) against the pre-visit token X_t^i, averaged over its
      law r given x (Rao-Blackwellised); it learns the reverse kernel q_s directly.
  """
  if kind not in LOSS_KINDS:
    raise ValueError(f"unknown GGM loss kind {kind!r}; known: {', '.join(LOSS_KINDS)}")
  if not 1 <= queries <= process.seq_len:
    raise ValueError(f"queries must be in 1..{process.seq_len} (distinct positions), got "
                     f"{queries}")
  step_rng, noise_rng, visit_rng = jax.random.split(rng, 3)
  batch_size = x.shape[0]
  counts_b = jnp.full((batch_size,), queries) if counts is None else counts
  t = stratified_steps(step_rng, batch_size, process.num_steps - counts_b + 1)  # [B]
  steps = t[:, None] + jnp.arange(queries)  # [B, Q]
  active = jnp.arange(queries) < counts_b[:, None]  # [B, Q]
  i = process.position(steps)  # [B, Q]
  x_t = process.noise_to(x, t, noise_rng)  # [B, L]
  if queries == 1 and counts is None:
    logits = _queried_logits(logits_fn, x_t, t, process)[:, None]  # [B, 1, V]
  else:
    at_i = jnp.any((jnp.arange(x.shape[1]) == i[:, :, None]) & active[:, :, None], axis=1)
    logits = logits_fn(jnp.where(at_i, process.query_id, x_t), t).astype(jnp.float32)
    logits = jnp.take_along_axis(logits, i[:, :, None], axis=1)  # [B, Q, V]
  mean_active = lambda per_visit: jnp.sum(jnp.where(active, per_visit, 0.0), 1) / counts_b

  pi = process.keep_prob(steps)[..., None]  # [B, Q, 1]
  clean_i = jnp.take_along_axis(x, i, axis=1)  # [B, Q]
  if kind == "hard":
    signal_rng, token_rng = jax.random.split(visit_rng)
    signal = jax.random.uniform(signal_rng, i.shape + (1,)) < pi  # [B, Q, 1]
    noise = process.draw_noise(token_rng, i.shape + (1,), x_t.dtype)
    observed = jnp.where(signal, jnp.take_along_axis(x_t, i, axis=1)[..., None], noise)
    l_b = jnp.take_along_axis(logits, observed, axis=2)[..., 0]
    return mean_active(-jnp.where(signal[..., 0], jax.nn.log_sigmoid(l_b),
                                  jax.nn.log_sigmoid(-l_b)))

  r = process.pre_visit_law(clean_i, steps)  # [B, Q, V]
  if kind == "ce":
    per_visit = -jnp.sum(r * jax.nn.log_softmax(logits + process.log_noise_dist(), axis=-1),
                         axis=-1)
  else:
    per_visit = -jnp.sum(pi * r * jax.nn.log_sigmoid(logits)
                         + process.noise_prob(steps) * jax.nn.log_sigmoid(-logits), axis=-1)
  return mean_active(per_visit)


def nelbo(logits_fn: LogitsFn, x: Array, rng: Array, process: GlauberProcess) -> Array:
  """Discrete-time negative ELBO of the reverse chain, nats per sequence: float[B] (>= -log p).

  The model's reverse kernel at step t is the exact time reversal built from the classifiers,

      R_t(a | b, x_{-i}) ∝ q_t(a | x_{-i}) [pi_t 1[a = b] + Pi_t(b)],   q_t ∝ u(a) exp(l(a)),

  with b the token at i = i_t in X_{t+1}; with perfect classifiers R_t is the true reversal.
  Each row draws one step t (stratified over the batch) and X_{t+1} | x in closed form, makes one
  network call (the query row at i, as `loss` does) and returns

      T * KL(q(X_t^i | X_{t+1}^i = b, x_i) || R_t(. | b, X_{t+1}^{-i})) + KL(q(X_T | x) || u^L),

  where the forward posterior is q(a | b, x_i) ∝ [pi_t 1[a = b] + Pi_t(b)] r_a (r the pre-visit
  law); on the first sweep it is a point mass at x_i and the term is -T log R_t(x_i | ...).
  """
  step_rng, noise_rng = jax.random.split(rng)
  t = stratified_steps(step_rng, x.shape[0], process.num_steps)  # [B]
  i = process.position(t)
  x_next = process.noise_to(x, t + 1, noise_rng)  # [B, L]
  logits = _queried_logits(logits_fn, x_next, t, process)  # [B, V]

  b = jnp.take_along_axis(x_next, i[:, None], axis=1)  # [B, 1]
  clean_i = jnp.take_along_axis(x, i[:, None], axis=1)[:, 0]
  log_u = process.log_noise_dist()
  # The visit's kernel P(b | a) is (1 - pi) u(b) for a != b, pi + (1 - pi) u(b) at a = b:
  # `boost` is log of their ratio, added at a = b.
  log_noise_b = jnp.log(process.noise_mass(t))[:, None] + log_u[b]  # [B, 1]
  boost = jnp.logaddexp(jnp.log(process.keep_prob(t))[:, None], log_noise_b) - log_noise_b
  at_b = jnp.arange(process.vocab_size) == b  # [B, V]
  log_reverse = jax.nn.log_softmax(logits + log_u + jnp.where(at_b, boost, 0.0), axis=-1)
  posterior = process.pre_visit_law(clean_i, t) * jnp.where(at_b, jnp.exp(boost), 1.0)
  posterior = posterior / posterior.sum(axis=-1, keepdims=True)
  safe = jnp.where(posterior > 0, posterior, 1.0)
  kl = jnp.sum(jnp.where(posterior > 0, posterior * (jnp.log(safe) - log_reverse), 0.0), axis=-1)
  return process.num_steps * kl + process.prior_kl(x)


def sample(logits_fn: LogitsFn, rng: Array, process: GlauberProcess, *, batch_size: int,
           known: Array | None = None, known_mask: Array | None = None,
           renoise_known: bool = False, temperature: float = 1.0,
           top_p: float | None = None) -> Array:
  """Heat-bath reverse sampler from noise X_T ~ u^L down to X_0: int[B, L].

  Step t resamples position i_t from softmax(l + log u) (plain softmax(l) for uniform noise), l
  the network's logits with position i_t replaced by the query id; temperature / top-p apply to
  l + log u.
  One network call per step, T = K * L steps in one `lax.fori_loop`.

  Infilling: positions where `known_mask` ([L] or [B, L]) is set hold `known` throughout and are
  never resampled; a step whose position is known in every row is skipped (no network call).
  With `renoise_known`, the network sees the known tokens re-noised to the current level, a fresh
  closed-form draw X_t | known at every step; the result still holds the clean known tokens.
  """
  seq_len, num_steps = process.seq_len, process.num_steps
  shape = (batch_size, seq_len)
  init_rng, loop_rng = jax.random.split(rng)
  z = process.draw_noise(init_rng, shape)
  conditioned = known_mask is not None
  if conditioned:
    if known is None:
      raise ValueError("known_mask given without known tokens")
    known_mask = jnp.broadcast_to(jnp.asarray(known_mask, bool), shape)
    known = jnp.broadcast_to(jnp.asarray(known, jnp.int32), shape)
    z = jnp.where(known_mask, known, z)
  positions = jnp.arange(seq_len)

  def visit(t: Array, step_rng: Array, z: Array) -> Array:
    i = process.position(t)
    context_rng, draw_rng = jax.random.split(step_rng)
    t_batch = jnp.full((batch_size,), t, jnp.int32)
    context = z
    if conditioned and renoise_known:
      context = jnp.where(known_mask, process.noise_to(known, t_batch, context_rng), z)
    x_in = jnp.where(positions == i, process.query_id, context)
    logits = _query_row(logits_fn(x_in, t_batch), i)
    if not process.uniform_noise:
      logits = logits + process.log_noise_dist()
    logits = adjust_logits(logits, temperature=temperature, top_p=top_p)
    token = sample_categorical(draw_rng, logits).astype(jnp.int32)  # [B]
    if conditioned:
      token = jnp.where(known_mask[:, i], z[:, i], token)
    return z.at[:, i].set(token)

  def step(s, z):
    t = num_steps - 1 - s
    step_rng = jax.random.fold_in(loop_rng, s)
    if not conditioned:
      return visit(t, step_rng, z)
    skip = jnp.all(known_mask[:, process.position(t)])
    return jax.lax.cond(skip, lambda z: z, lambda z: visit(t, step_rng, z), z)

  return jax.lax.fori_loop(0, num_steps, step, z)
