"""ReMDM remasking samplers for MD4 (Wang, Schiff, Sahoo, Kuleshov 2025; docs/methods.md §1).

The reverse step t -> s may remask tokens it has already revealed. With
sigma_max = min(1, (1 - alpha_s) / alpha_t) and any sigma_t in [0, sigma_max]:
  * an unmasked token stays with probability 1 - sigma_t and is remasked with probability sigma_t;
  * a masked token becomes v ~ mu with probability
    (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t), else stays masked.
Given x, a position is clean at s with probability alpha_t (1 - sigma) + (alpha_s - (1 - sigma)
alpha_t) = alpha_s whatever sigma is, so every such step keeps the forward marginals q(z_s | x) when
sigma does not depend on z_t. sigma = 0 is the ancestral sampler. In the continuous-time limit the
remask/unmask pair is in detailed balance with q_t (remask at rate r, unmask at rate
r alpha / (1 - alpha) with the exact conditional), so with the exact conditionals every schedule
below except `conf` samples p as the number of steps grows, and more steps than L keep correcting.

The sigma schedules (the forms of the paper's code):
  * cap: sigma_t = min(eta, sigma_max).
  * rescale: sigma_t = eta * sigma_max (eta in [0, 1]).
  * conf: each position's own sigma, sigma_t^l = w_l sigma_max for an unmasked, not known token,
    with w = softmax(-psi) over those tokens, psi_l the probability mu gave the token when it was
    revealed (low confidence: remasked first); masked tokens use sigma = 0 (ancestral unmasking).
    Not marginal-keeping: which tokens are masked depends on their values (through psi), and the
    total remasking is not matched by extra unmasking, so the law is biased (toward confident
    tokens) even with exact conditionals and many steps; it is exact only as the chain it defines
    (tests/test_samplers.py measures both).
  * loop: on the grid u_0 = 1 > ... > u_S = 0 the network time is t(u) = t_on_alpha +
    (1 - t_on_alpha) (u - t_on) / (1 - t_on) for u >= t_on, t_on_alpha for t_off <= u <= t_on,
    t_on_alpha u / t_off for u <= t_off, where alpha(t_on_alpha) = alpha_on. A step whose start u_i
    lies in (t_off, t_on] remasks with sigma = min(eta, sigma_max) (with alpha held, sigma_max =
    (1 - alpha_on) / alpha_on and the unmask probability is sigma alpha_on / (1 - alpha_on)); the
    other steps are ancestral (sigma = 0). For the linear schedule alpha is linear in u before and
    after the loop, as in the paper's code (which uses alpha_on = 0.9, t_on = 0.55, t_off = 0.05).
    Marginal-keeping: sigma depends on the step only.
The last step (s = 0) reveals every remaining mask with sigma = 0. Known positions are set before
the first step and never change (sigma = 0 for them). The network changes at every step, so there
is one network call per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from md4.diffusion.categorical import adjust_logits, sample_categorical
from md4.diffusion.masked import LogitsFn, initial_state, time_grid
from md4.diffusion.schedules import Schedule

Array = jnp.ndarray

SIGMA_SCHEDULES = ("cap", "rescale", "conf", "loop")


def inverse_alpha(schedule: Schedule, alpha: float, iterations: int = 60) -> Array:
  """The time t in [0, 1] with schedule.alpha(t) = alpha (bisection; alpha decreases in t)."""
  def halve(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    above = schedule.alpha(mid) > alpha
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  lo, hi = jax.lax.fori_loop(0, iterations, halve, (jnp.float32(0.0), jnp.float32(1.0)))
  return 0.5 * (lo + hi)


def loop_times(u: Array, schedule: Schedule, *, alpha_on: float, t_on: float,
               t_off: float) -> Array:
  """The loop schedule's network times t(u) for grid values u in [0, 1] (see the module doc)."""
  held = inverse_alpha(schedule, alpha_on)
  return jnp.where(u >= t_on, held + (1.0 - held) * (u - t_on) / (1.0 - t_on),
                   jnp.where(u > t_off, held, held * u / t_off))


def sample(logits_fn: LogitsFn, rng: Array, schedule: Schedule, *, batch_size: int, seq_len: int,
           vocab_size: int, num_steps: int, top_p: float | None = None, top_k: int | None = None,
           temperature: float = 1.0, grid: str = "uniform", known: Array | None = None,
           known_mask: Array | None = None, sigma_schedule: str = "cap", eta: float = 0.02,
           alpha_on: float = 0.9, t_on: float = 0.55, t_off: float = 0.05,
           return_network_calls: bool = False) -> Array | tuple[Array, Array]:
  """ReMDM sampler from the all-mask sequence: int[B, L] (and the network call count).

  sigma_schedule: cap | rescale | conf | loop (module doc); eta: its scale (unused by conf);
  alpha_on, t_on, t_off: the loop schedule's held alpha and its stretch of the grid.
  """
  if sigma_schedule not in SIGMA_SCHEDULES:
    raise ValueError(f"unknown sigma schedule {sigma_schedule!r}; known: "
                     f"{', '.join(SIGMA_SCHEDULES)}")
  if sigma_schedule == "loop" and not 0.0 < t_off < t_on < 1.0:
    raise ValueError(f"loop needs 0 < t_off < t_on < 1, got t_off={t_off}, t_on={t_on}")
  grid_u = time_grid(num_steps, grid)
  times = grid_u
  if sigma_schedule == "loop":
    times = loop_times(grid_u, schedule, alpha_on=alpha_on, t_on=t_on, t_off=t_off)
  mask_id = vocab_size
  z = initial_state(batch_size, seq_len, mask_id, known, known_mask)
  fixed = z != mask_id  # known positions
  psi = jnp.zeros(z.shape, jnp.float32)  # conf: probability of each token when it was revealed

  def sigma_of(i: Array, z: Array, psi: Array, sigma_max: Array) -> Array:
    """sigma for every position at step i: float[B, L]."""
    if sigma_schedule == "cap":
      sigma = jnp.minimum(eta, sigma_max)
    elif sigma_schedule == "rescale":
      sigma = eta * sigma_max
    elif sigma_schedule == "loop":
      in_loop = (grid_u[i] <= t_on) & (grid_u[i] > t_off)
      sigma = jnp.where(in_loop, jnp.minimum(eta, sigma_max), 0.0)
    else:  # conf
      remaskable = (z != mask_id) & ~fixed
      weight = jax.nn.softmax(jnp.where(remaskable, -psi, -jnp.inf), axis=-1)
      return jnp.where(remaskable, jnp.nan_to_num(weight) * sigma_max, 0.0)
    return jnp.broadcast_to(sigma, z.shape)

  def step(i, carry):
    z, psi = carry
    t, s = times[i], times[i + 1]
    alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(s)
    last = i == num_steps - 1
    sigma_max = jnp.minimum(1.0, (1.0 - alpha_s) / alpha_t)
    sigma = jnp.where(last | fixed, 0.0, sigma_of(i, z, psi, sigma_max))
    unmask_prob = jnp.where(last, 1.0, (alpha_s - (1.0 - sigma) * alpha_t) / (1.0 - alpha_t))
    logits = adjust_logits(logits_fn(z, jnp.full((batch_size,), t)), temperature=temperature,
                           top_p=top_p, top_k=top_k)
    value_rng, move_rng = jax.random.split(jax.random.fold_in(rng, i))
    values = sample_categorical(value_rng, logits)
    u = jax.random.uniform(move_rng, z.shape)
    masked = z == mask_id
    revealed = masked & (u < unmask_prob)
    remasked = ~masked & (u < sigma)
    z_next = jnp.where(revealed, values, jnp.where(remasked, mask_id, z))
    value_prob = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), values[..., None],
                                     axis=-1)[..., 0]
    return z_next, jnp.where(revealed, value_prob, psi)

  z, _ = jax.lax.fori_loop(0, num_steps, step, (z, psi))
  calls = jnp.array(num_steps, jnp.int32)
  return (z, calls) if return_network_calls else z
