"""MD4: masked diffusion (SPEC.md section 1). Pure functions of a `logits_fn` and a PRNG key.

Tokens are 0..V-1 and the mask id is V. `logits_fn(z, t)` maps z: int[B, L] in 0..V and
t: float[B] to float[B, L, V] logits of the clean token at every position.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from md4.diffusion.categorical import adjust_logits, sample_categorical
from md4.diffusion.schedules import Schedule

Array = jnp.ndarray
LogitsFn = Callable[..., Array]


def antithetic_times(rng: Array, batch_size: int) -> Array:
  """Stratified times t_i = (u + i / B) mod 1 with one shared u ~ U[0, 1): float[B]."""
  u = jax.random.uniform(rng, ())
  return jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)


def mask_tokens(rng: Array, x: Array, keep_prob: Array, mask_id: int) -> Array:
  """Keeps each token of x: int[B, L] with probability keep_prob: float[B], else masks it."""
  keep = jax.random.uniform(rng, x.shape) < keep_prob[:, None]
  return jnp.where(keep, x, mask_id)


def _masked_log_likelihood(logits_fn: LogitsFn, z: Array, t: Array, x: Array, mask_id: int,
                           head_capacity: int | None) -> Array:
  """Sum over masked positions of log mu(x_n): float[B].

  With `head_capacity` C, the network is asked for logits only at the masked positions, as
  `logits_fn(z, t, head_index)` with head_index: int[C] flat indices into B * L, returning
  float[C, V]; if more than C positions are masked it falls back to the full output, so the
  result is exact either way.
  """
  masked = z == mask_id

  def full(_):
    log_mu = jax.nn.log_softmax(logits_fn(z, t).astype(jnp.float32), axis=-1)
    log_mu_x = jnp.take_along_axis(log_mu, x[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(masked, log_mu_x, 0.0), axis=-1)

  if head_capacity is None:
    return full(None)

  flat_masked = masked.reshape(-1)

  def gathered(_):
    (index,) = jnp.nonzero(flat_masked, size=head_capacity, fill_value=0)
    valid = jnp.arange(head_capacity) < jnp.sum(flat_masked)
    log_mu = jax.nn.log_softmax(logits_fn(z, t, index).astype(jnp.float32), axis=-1)
    log_mu_x = jnp.take_along_axis(log_mu, x.reshape(-1)[index][:, None], axis=-1)[:, 0]
    per_position = jnp.zeros(flat_masked.shape).at[index].add(jnp.where(valid, log_mu_x, 0.0))
    return per_position.reshape(z.shape).sum(axis=-1)

  return jax.lax.cond(jnp.sum(flat_masked) <= head_capacity, gathered, full, None)


def nelbo(logits_fn: LogitsFn, x: Array, rng: Array, schedule: Schedule, *, vocab_size: int,
          num_steps: int = 0, head_capacity: int | None = None) -> Array:
  """Negative ELBO in nats per sequence: float[B] (an unbiased one-sample estimate per row).

  Args:
    logits_fn: network, (z: int[B, L], t: float[B]) -> float[B, L, V].
    x: clean tokens int[B, L] in 0..V-1.
    rng: PRNG key.
    schedule: masking schedule.
    vocab_size: V; the mask id is V.
    num_steps: 0 for the continuous-time NELBO, T > 0 for the discrete-time one.
    head_capacity: optional; see `_masked_log_likelihood`.
  """
  time_rng, mask_rng = jax.random.split(rng)
  batch_size, seq_len = x.shape
  t = antithetic_times(time_rng, batch_size)
  if num_steps:
    t = jnp.maximum(jnp.ceil(t * num_steps), 1.0) / num_steps  # snap up to {1/T, ..., 1}
    alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(t - 1.0 / num_steps)
    weight = -num_steps * (alpha_s - alpha_t) / (1.0 - alpha_t)
  else:
    alpha_t = schedule.alpha(t)
    weight = schedule.weight(t)
  z = mask_tokens(mask_rng, x, alpha_t, vocab_size)
  log_likelihood = _masked_log_likelihood(logits_fn, z, t, x, vocab_size, head_capacity)
  # Tokens still masked at t = 0 are bounded by the uniform code length log V.
  reconstruction = seq_len * (1.0 - schedule.alpha(jnp.zeros(()))) * math.log(vocab_size)
  return weight * log_likelihood + reconstruction


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


def sample(logits_fn: LogitsFn, rng: Array, schedule: Schedule, *, batch_size: int, seq_len: int,
           vocab_size: int, num_steps: int, top_p: float | None = None, temperature: float = 1.0,
           grid: str = "uniform", known: Array | None = None, known_mask: Array | None = None,
           cache: bool = True, return_network_calls: bool = False) -> Array | tuple[Array, Array]:
  """Ancestral sampler from the all-mask sequence: int[B, L] (and the network call count).

  At each step t -> s every masked position is revealed with probability
  (alpha_s - alpha_t) / (1 - alpha_t), its value drawn from mu (after temperature / top-p); at the
  last step every remaining mask is revealed. Known positions are set before the first step and
  never change. With `cache`, a step that follows a step where nothing was revealed reuses the
  previous logits instead of calling the network: exact when the network does not depend on t
  (as the true denoiser does not), an approximation for a time-conditioned network otherwise.
  """
  times = time_grid(num_steps, grid)
  mask_id = vocab_size
  z = initial_state(batch_size, seq_len, mask_id, known, known_mask)

  def call(z: Array, t: Array) -> Array:
    logits = logits_fn(z, jnp.full((batch_size,), t))
    return adjust_logits(logits, temperature=temperature, top_p=top_p)

  def step(i, carry):
    z, logits, stale, calls = carry
    t, s = times[i], times[i + 1]
    if cache:
      logits = jax.lax.cond(stale, lambda: call(z, t), lambda: logits)
    else:
      logits = call(z, t)
    calls = calls + stale.astype(jnp.int32) if cache else calls + 1
    alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(s)
    reveal_prob = jnp.where(i == num_steps - 1, 1.0, (alpha_s - alpha_t) / (1.0 - alpha_t))
    step_rng = jax.random.fold_in(rng, i)
    reveal_rng, value_rng = jax.random.split(step_rng)
    reveal = (z == mask_id) & (jax.random.uniform(reveal_rng, z.shape) < reveal_prob)
    z = jnp.where(reveal, sample_categorical(value_rng, logits), z)
    return z, logits, jnp.any(reveal), calls

  logits = jnp.zeros((batch_size, seq_len, vocab_size), jnp.float32)
  carry = (z, logits, jnp.array(True), jnp.array(0, jnp.int32))
  z, _, _, calls = jax.lax.fori_loop(0, num_steps, step, carry)
  return (z, calls) if return_network_calls else z
