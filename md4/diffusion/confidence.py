"""Confidence-ordered decoding for masked diffusion (MaskGIT, Chang et al. 2022; LLaDA, Nie et al.
2025). Not an exact sampler of the model: it reveals first what the network is most sure of.

Each step t_i -> t_{i+1} calls the network on z, scores every masked position, and reveals the
best-scored ones, their values drawn from mu (after temperature / top-k / top-p). Scores, of the
network's own distribution mu (before temperature and filtering):
  * max_prob: the largest probability of the position's distribution;
  * margin: the largest minus the second largest probability;
  * neg_entropy: minus the entropy of the distribution (nats);
plus gumbel_temperature times a standard Gumbel draw per position and step (0: deterministic
order; inf: the order is uniformly random, whatever the network says).

How many positions are revealed: with tokens_per_step = 0 the schedule's expected share, i.e.
after step i row b has revealed round(M_b (1 - (1 - alpha(t_{i+1})) / (1 - alpha(t_0)))) of its
M_b initially masked positions; with tokens_per_step = k, min(M_b, k (i + 1)). The last step
reveals whatever is left. A step that reveals nothing in any row is skipped without a network
call, so the call count is the number of steps that reveal something (at most min(num_steps, L)).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from md4.diffusion.categorical import adjust_logits, sample_categorical
from md4.diffusion.masked import LogitsFn, initial_state, time_grid
from md4.diffusion.schedules import Schedule

Array = jnp.ndarray

CONFIDENCES = ("max_prob", "margin", "neg_entropy")


def confidence_score(logits: Array, kind: str) -> Array:
  """float[...] confidence of each distribution given by logits: float[..., V]."""
  probs = jax.nn.softmax(logits, axis=-1)
  if kind == "max_prob":
    return jnp.max(probs, axis=-1)
  if kind == "margin":
    top2 = jax.lax.top_k(probs, 2)[0]
    return top2[..., 0] - top2[..., 1]
  if kind == "neg_entropy":
    log_probs = jnp.where(probs > 0, jax.nn.log_softmax(logits, axis=-1), 0.0)
    return jnp.sum(probs * log_probs, axis=-1)
  raise ValueError(f"unknown confidence {kind!r}; known: {', '.join(CONFIDENCES)}")


def reveal_counts(schedule: Schedule, times: Array, num_masked: Array,
                  tokens_per_step: int) -> Array:
  """Positions revealed after each step, cumulative: int[S, B] (the last row is num_masked)."""
  num_steps = times.shape[0] - 1
  if tokens_per_step:
    counts = tokens_per_step * jnp.arange(1, num_steps + 1)[:, None]
    counts = jnp.minimum(counts, num_masked[None])
  else:
    alpha = schedule.alpha(times)
    share = 1.0 - (1.0 - alpha[1:]) / (1.0 - alpha[0])  # [S], increasing
    counts = jnp.round(share[:, None] * num_masked[None]).astype(jnp.int32)
  return counts.at[-1].set(num_masked)


def sample(logits_fn: LogitsFn, rng: Array, schedule: Schedule, *, batch_size: int, seq_len: int,
           vocab_size: int, num_steps: int, top_p: float | None = None, top_k: int | None = None,
           temperature: float = 1.0, grid: str = "uniform", known: Array | None = None,
           known_mask: Array | None = None, confidence: str = "max_prob",
           gumbel_temperature: float = 0.0, tokens_per_step: int = 0,
           return_network_calls: bool = False) -> Array | tuple[Array, Array]:
  """Confidence-ordered decoding from the all-mask sequence: int[B, L] (and the call count).

  `schedule` sets the reveal counts and the network's time input; for GenMD4 (value-dependent
  schedules) the caller passes the linear schedule, i.e. equal shares per step.
  """
  if confidence not in CONFIDENCES:
    raise ValueError(f"unknown confidence {confidence!r}; known: {', '.join(CONFIDENCES)}")
  if not 0 <= tokens_per_step <= seq_len:
    raise ValueError(f"tokens_per_step must be in 0..{seq_len} (0: from the schedule), "
                     f"got {tokens_per_step}")
  times = time_grid(num_steps, grid)
  mask_id = vocab_size
  z = initial_state(batch_size, seq_len, mask_id, known, known_mask)
  num_masked = jnp.sum(z == mask_id, axis=1)
  counts = reveal_counts(schedule, times, num_masked, tokens_per_step)

  def reveal(i: Array, z: Array, need: Array) -> Array:
    """Reveals the need[b] best-scored masked positions of each row b."""
    logits = logits_fn(z, jnp.full((batch_size,), times[i])).astype(jnp.float32)
    value_rng, order_rng = jax.random.split(jax.random.fold_in(rng, i))
    values = sample_categorical(value_rng, adjust_logits(
        logits, temperature=temperature, top_p=top_p, top_k=top_k))
    gumbel = jax.random.gumbel(order_rng, z.shape)
    if math.isinf(gumbel_temperature):
      score = gumbel
    else:
      score = confidence_score(logits, confidence)
      if gumbel_temperature:
        score = score + gumbel_temperature * gumbel
    masked = z == mask_id
    score = jnp.where(masked, score, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-score, axis=-1), axis=-1)
    return jnp.where(masked & (rank < need[:, None]), values, z)

  def step(i, carry):
    z, calls = carry
    need = counts[i] - (num_masked - jnp.sum(z == mask_id, axis=1))
    busy = jnp.any(need > 0)
    z = jax.lax.cond(busy, lambda z: reveal(i, z, need), lambda z: z, z)
    return z, calls + busy.astype(jnp.int32)

  z, calls = jax.lax.fori_loop(0, num_steps, step, (z, jnp.array(0, jnp.int32)))
  return (z, calls) if return_network_calls else z
