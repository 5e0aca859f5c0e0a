"""MD4: masked diffusion (docs/methods.md §1). Pure functions of a `logits_fn` and a PRNG key.

Tokens are 0..V-1 and the mask id is V. `logits_fn(z, t)` maps z: int[B, L] in 0..V and
t: float[B] to float[B, L, V] logits of the clean token at every position.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from md4.diffusion.categorical import adjust_logits, sample_categorical
from md4.diffusion.cross_entropy import log_prob
from md4.diffusion.schedules import Schedule

Array = jnp.ndarray
LogitsFn = Callable[..., Array]


def interleaved_strata(n: int) -> np.ndarray:
  """0..n-1 in bit-reversed (van der Corput) order, int[n]: for n a power of two, every block of
  n / 2^k consecutive entries holds one value from each of its strata [j n / 2^k ... )."""
  bits = max(n - 1, 0).bit_length()
  order = np.array([int(f"{i:0{bits}b}"[::-1], 2) for i in range(2**bits)])
  return order[order < n]


def antithetic_times(rng: Array, batch_size: int) -> Array:
  """Stratified times t_i = (u + s_i / B) mod 1 with one shared u ~ U[0, 1): float[B].

  The strata s = interleaved_strata(B) are a bit-reversed permutation of 0..B-1, so that each
  contiguous block of rows (one device's share of a batch-sharded batch) covers all of [0, 1)
  and the devices see equal numbers of masked tokens.
  """
  u = jax.random.uniform(rng, ())
  strata = jnp.asarray(interleaved_strata(batch_size), jnp.float32)
  return jnp.mod(u + strata / batch_size, 1.0)


def mask_tokens(rng: Array, x: Array, keep_prob: Array, mask_id: int) -> Array:
  """Keeps each token of x: int[B, L] with probability keep_prob: float[B], else masks it."""
  keep = jax.random.uniform(rng, x.shape) < keep_prob[:, None]
  return jnp.where(keep, x, mask_id)


def _masked_log_likelihood(logits_fn: LogitsFn, z: Array, t: Array, x: Array, mask_id: int,
                           head_capacity: int | None, head_groups: int = 1) -> Array:
  """Sum over masked positions of log mu(x_n): float[B].

  With `head_capacity` C the head runs only at masked positions. The batch is split into
  `head_groups` G groups of consecutive rows (one per device when G is the number of batch
  shards, so that every gather stays on its device; G = B is per row), and the network is called
  as `logits_fn(z, t, head_reduce=reduce)`: it runs its trunk once and returns `reduce(head)`,
  where `head(index)` gives float[G, C, V] logits at index: int[G, C] (flat positions within each
  group's B / G * L tokens) and `head(None)` the full float[B, L, V]. If some group has more than
  C masked positions the full head is taken instead (a `lax.cond` on the head alone), so the
  result is exact either way.
  """
  masked = z == mask_id

  def from_full(logits: Array) -> Array:
    log_mu_x = log_prob(logits, x)
    return jnp.sum(jnp.where(masked, log_mu_x, 0.0), axis=-1)

  if head_capacity is None:
    return from_full(logits_fn(z, t))

  group_masked = masked.reshape(head_groups, -1)  # [G, B / G * L]
  index = jax.vmap(lambda m: jnp.nonzero(m, size=head_capacity, fill_value=0)[0])(group_masked)
  counts = jnp.sum(group_masked, axis=1)
  valid = jnp.arange(head_capacity) < counts[:, None]  # [G, C]
  targets = jnp.take_along_axis(x.reshape(head_groups, -1), index, axis=1)

  # The row (within its group) of each gathered position, as a one-hot [G, C, B / G]: summing
  # per row by a contraction keeps the sum local to each group, where a scatter would not be.
  rows = jax.nn.one_hot(index // z.shape[1], z.shape[0] // head_groups, dtype=jnp.float32)

  def from_gathered(logits: Array) -> Array:
    log_mu_x = log_prob(logits, targets)
    per_row = jnp.einsum("gc,gcr->gr", jnp.where(valid, log_mu_x, 0.0), rows,
                         precision=jax.lax.Precision.HIGHEST)
    return per_row.reshape(-1)

  def reduce(head: Callable) -> Array:
    return jax.lax.cond(jnp.max(counts) <= head_capacity, lambda: from_gathered(head(index)),
                        lambda: from_full(head(None)))

  return logits_fn(z, t, head_reduce=reduce)


def boundary_nats(seq_len: int, keep_at_one: Array | float, masked_at_zero: Array | float,
                  vocab_size: int) -> Array | float:
  """The NELBO's prior and reconstruction terms, nats per sequence (docs/bounds.md).

  Prior at t = 1: a token is still clean with probability keep_at_one = alpha(1); against the
  prior that keeps a uniform token with that probability (else the mask) the KL is exactly
  alpha(1) log V per token. Reconstruction at t = 0: a token still masked there, with probability
  masked_at_zero = 1 - alpha(0), is coded uniformly (log V). MD4 and GenMD4 both use this.
  """
  return seq_len * (keep_at_one + masked_at_zero) * math.log(vocab_size)


def mask_exactly(rng: Array, x: Array, counts: Array, mask_id: int) -> Array:
  """Masks `counts[b]` positions of row b of x: int[B, L], chosen uniformly at random."""
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng, x.shape), axis=-1), axis=-1)
  return jnp.where(ranks < counts[:, None], mask_id, x)


def nelbo(logits_fn: LogitsFn, x: Array, rng: Array, schedule: Schedule, *, vocab_size: int,
          num_steps: int = 0, head_capacity: int | None = None, head_groups: int = 1,
          estimator: str = "time") -> Array:
  """Negative ELBO in nats per sequence: float[B] (an unbiased one-sample estimate per row).

  Args:
    logits_fn: network, (z: int[B, L], t: float[B]) -> float[B, L, V].
    x: clean tokens int[B, L] in 0..V-1.
    rng: PRNG key.
    schedule: masking schedule.
    vocab_size: V; the mask id is V.
    num_steps: 0 for the continuous-time NELBO, T > 0 for the discrete-time one.
    head_capacity, head_groups: optional; see `_masked_log_likelihood`.
    estimator: "time" draws t (antithetic over the batch) and masks each token with
      probability 1 - alpha(t). "count", for networks that ignore t, draws the number of masked
      tokens k (stratified over 1..L across the batch), masks exactly k positions and weights
      their log-likelihood by L / k. For such networks the continuous-time NELBO is, whatever
      the schedule, the any-order autoregressive bound
      sum_k E_{|M| = k} [(1 / k) sum_{n in M} -log mu_n(x_n)], of which this is the stratified
      estimate; it avoids the time estimator's rare large 1/t weights (lower variance), and
      it leaves out the prior and reconstruction terms (`boundary_nats`; a tighter bound by
      N (alpha(1) + 1 - alpha(0)) log V).
      t = k / L is passed to the network. Continuous time only.
  """
  if estimator not in ("time", "count"):
    raise ValueError(f"unknown NELBO estimator {estimator!r}; known: time, count")
  if estimator == "count" and num_steps:
    raise ValueError("the count estimator is for the continuous-time NELBO (num_steps=0)")
  time_rng, mask_rng = jax.random.split(rng)
  batch_size, seq_len = x.shape
  t = antithetic_times(time_rng, batch_size)
  if estimator == "count":
    counts = jnp.minimum(jnp.floor(t * seq_len).astype(jnp.int32) + 1, seq_len)  # 1..L
    z = mask_exactly(mask_rng, x, counts, vocab_size)
    t = counts.astype(jnp.float32) / seq_len
    weight, boundary = -seq_len / counts.astype(jnp.float32), 0.0
  else:
    if num_steps:
      t = jnp.maximum(jnp.ceil(t * num_steps), 1.0) / num_steps  # snap up to {1/T, ..., 1}
      # alpha_s - alpha_t = (1 - alpha_t) - (1 - alpha_s), both in closed form.
      masked_t = schedule.one_minus_alpha(t)
      masked_s = schedule.one_minus_alpha(t - 1.0 / num_steps)
      weight = -num_steps * (masked_t - masked_s) / masked_t
    else:
      weight = schedule.weight(t)
    z = mask_tokens(mask_rng, x, schedule.alpha(t), vocab_size)
    boundary = boundary_nats(seq_len, schedule.alpha(jnp.ones(())),
                             schedule.one_minus_alpha(jnp.zeros(())), vocab_size)
  log_likelihood = _masked_log_likelihood(logits_fn, z, t, x, vocab_size, head_capacity,
                                          head_groups)
  return weight * log_likelihood + boundary


def left_to_right_nll(logits_fn: LogitsFn, x: Array, *, vocab_size: int) -> Array:
  """-log q(x) in nats per sequence, float[B], for q(x) = prod_i p(x_i | x_<i, the rest masked):
  the exact likelihood of decoding the same network left to right one token at a time (block
  decoding with blocks of 1). L network calls, head at the decoded position only; call i gets
  t = (L - i) / L, the time at which a linear schedule masks the share still masked.

  With the exact conditionals q = p. Against the NELBO, which averages over random orders
  (docs/methods.md §1), it separates what the order costs from what the network lacks.
  """
  batch, seq_len = x.shape

  def step(z, i):
    t = jnp.full((batch,), (seq_len - i) / seq_len, jnp.float32)
    logits = logits_fn(z, t, head_index=jnp.full((batch, 1), i))[:, 0, :vocab_size]  # [B, V]
    x_i = jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)
    z = jax.lax.dynamic_update_index_in_dim(z, x_i, i, axis=1)
    return z, -log_prob(logits, x_i)

  z0 = jnp.full_like(x, vocab_size)
  _, nll = jax.lax.scan(step, z0, jnp.arange(seq_len))
  return nll.sum(axis=0)


def time_grid(num_steps: int, grid: str = "uniform") -> Array:
  """Decreasing times 1 = t_0 > t_1 > ... > t_S = 0: float[S + 1]."""
  u = jnp.linspace(1.0, 0.0, num_steps + 1)
  if grid == "uniform":
    return u
  if grid == "cosine":
    return jnp.sin(0.5 * jnp.pi * u)
  raise ValueError(f"unknown time grid {grid!r}; known: uniform, cosine")


def initial_state(batch_size: int, seq_len: int, mask_id: int, known: Array | None,
                  known_mask: Array | None) -> Array:
  """All-mask int[B, L], with the user's known tokens written in where known_mask is set."""
  z = jnp.full((batch_size, seq_len), mask_id, dtype=jnp.int32)
  if known_mask is None:
    return z
  if known is None:
    raise ValueError("known_mask given without known tokens")
  known_mask = jnp.broadcast_to(known_mask, z.shape)
  return jnp.where(known_mask, jnp.broadcast_to(known, z.shape).astype(jnp.int32), z)


def reveal_steps(rng: Array, schedule: Schedule, times: Array, shape: tuple[int, ...]) -> Array:
  """The step at which each position is revealed, int[shape] in 0..S-1.

  In the ancestral sampler a masked position is revealed at step i (t_i -> t_{i+1}) with
  probability r_i = (alpha_{i+1} - alpha_i) / (1 - alpha_i), whatever the network says, and the
  last step reveals everything. So reveal steps are independent across positions, with
  P(still masked after step i) = (1 - alpha(t_{i+1})) / (1 - alpha(t_0)) (the product telescopes).
  """
  masked = schedule.one_minus_alpha(times)
  still_masked = (masked[1:] / masked[0]).at[-1].set(0.0)  # [S], decreasing
  u = jax.random.uniform(rng, shape)
  # The number of steps after which the position is still masked, i.e. its reveal step.
  return jnp.searchsorted(-still_masked, -u, side="left").astype(jnp.int32)


def _draw_values(rng: Array, steps: Array, logits: Array) -> Array:
  """Values for every position of row b from logits[b], with a key depending on (step_b, b)."""
  rows = jnp.arange(logits.shape[0])
  keys = jax.vmap(lambda s, b: jax.random.fold_in(jax.random.fold_in(rng, s), b))(steps, rows)
  return jax.vmap(sample_categorical)(keys, logits)


def sample(logits_fn: LogitsFn, rng: Array, schedule: Schedule, *, batch_size: int, seq_len: int,
           vocab_size: int, num_steps: int, top_p: float | None = None, top_k: int | None = None,
           temperature: float = 1.0, grid: str = "uniform", known: Array | None = None,
           known_mask: Array | None = None, cache: bool = True,
           return_network_calls: bool = False) -> Array | tuple[Array, Array]:
  """Ancestral sampler from the all-mask sequence: int[B, L] (and the network call count).

  At each step t -> s every masked position is revealed with probability
  (alpha_s - alpha_t) / (1 - alpha_t), its value drawn from mu(z_t, t) (after temperature /
  top-k / top-p); the last step reveals every remaining mask. Known positions are set before the
  first step and never change.

  Which positions are revealed when does not depend on the network, so it is drawn up front
  (`reveal_steps`). A row's state changes only at its own reveal steps, so with `cache` the
  network is called once per *event* of each row, rows advancing through their own events in
  lock step (each at its own time t): the number of calls is the largest number of distinct
  reveal steps of a row, at most min(num_steps, L), instead of num_steps. This is exact for any
  network, time-conditioned or not: `cache=False` (one call per step) gives the same samples for
  the same key.
  """
  times = time_grid(num_steps, grid)
  mask_id = vocab_size
  z = initial_state(batch_size, seq_len, mask_id, known, known_mask)
  schedule_rng, value_rng = jax.random.split(rng)
  reveal_at = reveal_steps(schedule_rng, schedule, times, z.shape)
  reveal_at = jnp.where(z == mask_id, reveal_at, num_steps + 1)  # known: never revealed

  def reveal(z: Array, steps: Array) -> Array:
    """Row b draws the positions it reveals at step steps[b] from mu(z_b, t_{steps[b]})."""
    t = times[jnp.minimum(steps, num_steps - 1)]
    logits = adjust_logits(logits_fn(z, t), temperature=temperature, top_p=top_p, top_k=top_k)
    values = _draw_values(value_rng, steps, logits)
    return jnp.where(reveal_at == steps[:, None], values, z)

  if not cache:
    z = jax.lax.fori_loop(0, num_steps, lambda i, z: reveal(z, jnp.full((batch_size,), i)), z)
    calls = jnp.array(num_steps, jnp.int32)
  else:
    # Each row's distinct reveal steps in increasing order, padded with num_steps ("done").
    rows = jnp.arange(batch_size)[:, None]
    has_event = jnp.zeros((batch_size, num_steps), bool).at[rows, reveal_at].set(True, mode="drop")
    events = jnp.sort(jnp.where(has_event, jnp.arange(num_steps), num_steps), axis=1)
    calls = jnp.max(jnp.sum(has_event, axis=1)).astype(jnp.int32)
    _, z = jax.lax.while_loop(lambda c: c[0] < calls,
                              lambda c: (c[0] + 1, reveal(c[1], events[:, c[0]])), (0, z))
  return (z, calls) if return_network_calls else z
