"""Blackout Diffusion (docs/methods.md §4): a pure-death forward process on integer counts.

Each pixel channel holds a count n in {0..N}. Forward, every one of the x particles of a pixel
dies at rate 1, so n_t | x ~ Binomial(x, p_t) with survival p_t = exp(-t): the image fades to
black. The network estimates lam = E[x - n_t | n_t], the particles still to be born; the reverse
process is pure birth.

Time grid (indexing used everywhere below): index 0 is the clean image, t_0 = 0, p_0 = 1, and
k = 1..T are the T observation times. f_1..f_T are evenly spaced from -logit(e^{-t_end}) to
logit(e^{-t_end}), p_k = sigmoid(f_k), t_k = -log p_k; so p_1 = 1 - e^{-t_end} (almost clean),
p_T = e^{-t_end} (almost black) and t_T = t_end. Arrays have T + 1 entries indexed by k.

`rate_fn(n: int[B, ...], k: int[B]) -> float[B, ...] >= 0` is the network with k in 1..T.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray
RateFn = Callable[[Array, Array], Array]

WEIGHTINGS = ("instantaneous", "finite-time")
SAMPLERS = ("tau_leaping", "bridge", "bridge_stochastic")
LOG_FLOOR = 1e-8  # lam is floored here inside the log, so that lam = 0 costs a finite amount


class BlackoutProcess:
  """The log-odds time grid and its derived quantities, all float32[T + 1] indexed by k = 0..T.

  Attributes:
    num_steps: T.
    t_end: the last time t_T.
    max_count: N, the largest count of a pixel channel.
    p: survival probabilities, p[0] = 1 > p[1] > ... > p[T] = e^{-t_end}.
    t: times -log p, t[0] = 0.
    rho: reverse birth probabilities (p[k-1] - p[k]) / (1 - p[k]); rho[1] = 1, rho[0] unused (0).
    weights: {"instantaneous": T p_k (t_k - t_{k-1}), "finite-time": p_{k-1} - p_k}; entry 0 is 0.
  """

  def __init__(self, num_steps: int, t_end: float, max_count: int):
    if num_steps < 1 or t_end <= 0 or max_count < 1:
      raise ValueError(f"need num_steps >= 1, t_end > 0, max_count >= 1; got "
                       f"{num_steps}, {t_end}, {max_count}")
    self.num_steps, self.t_end, self.max_count = num_steps, float(t_end), int(max_count)
    # Computed in float64: 1 - p_1 = e^{-t_end} would lose most of its digits in float32.
    edge = -math.log(math.expm1(t_end))  # logit(e^{-t_end}) = -log(e^{t_end} - 1)
    f = np.linspace(-edge, edge, num_steps) if num_steps > 1 else np.array([edge])
    p = np.concatenate([[1.0], 1.0 / (1.0 + np.exp(-f))])
    one_minus_p = np.concatenate([[0.0], 1.0 / (1.0 + np.exp(f))])
    t = np.concatenate([[0.0], np.log1p(np.exp(-f))])  # -log sigmoid(f)
    rho = np.zeros(num_steps + 1)
    rho[1:] = (p[:-1] - p[1:]) / one_minus_p[1:]
    rho[1] = 1.0  # p_0 = 1: every particle still unborn at k = 1 is born
    inst = np.zeros(num_steps + 1)
    inst[1:] = num_steps * p[1:] * np.diff(t)
    finite = np.zeros(num_steps + 1)
    finite[1:] = p[:-1] - p[1:]
    self.p = jnp.asarray(p, jnp.float32)
    self.t = jnp.asarray(t, jnp.float32)
    self.rho = jnp.asarray(rho, jnp.float32)
    self.weights = {"instantaneous": jnp.asarray(inst, jnp.float32),
                    "finite-time": jnp.asarray(finite, jnp.float32)}


def thin(rng: Array, n: Array, keep_prob: Array) -> Array:
  """Binomial(n, keep_prob) elementwise (exact), int32 of n's shape; keep_prob broadcasts."""
  keep_prob = jnp.broadcast_to(keep_prob, n.shape).astype(jnp.float32)
  draw = jax.random.binomial(rng, n.astype(jnp.float32), jnp.clip(keep_prob, 0.0, 1.0))
  return draw.astype(jnp.int32)


def _per_example(values: Array, k: Array, ndim: int) -> Array:
  """values[k] for k: int[B], shaped [B, 1, ..., 1] to broadcast against rank-`ndim` arrays."""
  return values[k].reshape(k.shape + (1,) * (ndim - 1))


def poisson_loss(lam: Array, m: Array) -> Array:
  """lam - m log lam elementwise, with 0 log 0 = 0 and lam floored at LOG_FLOOR in the log."""
  log_lam = jnp.log(jnp.maximum(lam, LOG_FLOOR))
  return lam - jnp.where(m > 0, m * log_lam, 0.0)


def loss(rate_fn: RateFn, x: Array, rng: Array, process: BlackoutProcess, *,
         weighting: str = "instantaneous") -> Array:
  """Weighted Poisson loss per example: float[B].

  k ~ U{1..T}, n ~ Binomial(x, p_k) exactly, target m = x - n, and the loss is
  w_k * sum over pixels of (lam - m log lam) with lam = rate_fn(n, k).

  Args:
    rate_fn: network, (n: int[B, ...], k: int[B]) -> float[B, ...] >= 0.
    x: clean counts int[B, ...] in 0..N.
    rng: PRNG key.
    process: the time grid.
    weighting: "instantaneous" or "finite-time".
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")
  k_rng, n_rng = jax.random.split(rng)
  x = x.astype(jnp.int32)
  k = jax.random.randint(k_rng, (x.shape[0],), 1, process.num_steps + 1)
  n = thin(n_rng, x, _per_example(process.p, k, x.ndim))
  lam = rate_fn(n, k).astype(jnp.float32)
  per_pixel = poisson_loss(lam, (x - n).astype(jnp.float32))
  return process.weights[weighting][k] * per_pixel.reshape(x.shape[0], -1).sum(axis=-1)


def _round(rng: Array, lam: Array, stochastic: bool) -> Array:
  """Nearest integer, or floor(lam) + Bernoulli(frac(lam)) (unbiased) when stochastic."""
  if not stochastic:
    return jnp.round(lam)
  floor = jnp.floor(lam)
  return floor + (jax.random.uniform(rng, lam.shape) < lam - floor)


def sample(rate_fn: RateFn, rng: Array, process: BlackoutProcess, *, shape: tuple[int, ...],
           sampler: str = "tau_leaping") -> Array:
  """Generates counts int32[shape] in 0..N by pure birth from the black image.

  For k = T..1 with rho = (p_{k-1} - p_k) / (1 - p_k) and lam = rate_fn(n, k):
    tau_leaping:        n += Poisson(lam * rho)
    bridge:             n += Binomial(round(lam), rho)
    bridge_stochastic:  n += Binomial(floor(lam) + Bernoulli(frac(lam)), rho)
  then n is clipped to [0, N]. At k = 1, rho = 1 and the bridges add all their births.
  One lax.fori_loop; shape[0] is the batch size.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
  num_steps, max_count = process.num_steps, process.max_count

  def step(i, state):
    n, rng = state
    rng, birth_rng, round_rng = jax.random.split(rng, 3)
    k = num_steps - i
    lam = jnp.maximum(rate_fn(n, jnp.full((shape[0],), k, jnp.int32)).astype(jnp.float32), 0.0)
    rho = process.rho[k]
    if sampler == "tau_leaping":
      births = jax.random.poisson(birth_rng, lam * rho, dtype=jnp.int32)
    else:
      unborn = _round(round_rng, lam, stochastic=sampler == "bridge_stochastic")
      # jax.random.binomial wants 0 < p < 1: rho = 1 (k = 1) takes every unborn particle.
      partial = thin(birth_rng, unborn.astype(jnp.int32), jnp.minimum(rho, 1.0 - 1e-7))
      births = jnp.where(rho >= 1.0, unborn.astype(jnp.int32), partial)
    return jnp.clip(n + births, 0, max_count), rng

  n0 = jnp.zeros(shape, jnp.int32)
  n, _ = jax.lax.fori_loop(0, num_steps, step, (n0, rng))
  return n
