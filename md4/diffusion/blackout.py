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
from jax.scipy.special import gammaln, xlogy

Array = jnp.ndarray
RateFn = Callable[[Array, Array], Array]

WEIGHTINGS = ("instantaneous", "finite-time", "elbo")
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
    stay: 1 - rho = (1 - p[k-1]) / (1 - p[k]) (from float64, no cancellation); stay[1] = 0.
    weights: {"instantaneous": T p_k (t_k - t_{k-1}), "finite-time": p_{k-1} - p_k,
      "elbo": T rho_k}; entry 0 is 0. Only "elbo" makes the loss the NELBO up to a constant
      (docs/bounds.md); the other two are it times (1 - p_k): same minimiser, not a bound.
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
    stay = np.zeros(num_steps + 1)
    stay[2:] = one_minus_p[1:-1] / one_minus_p[2:]
    self.p = jnp.asarray(p, jnp.float32)
    self.t = jnp.asarray(t, jnp.float32)
    self.rho = jnp.asarray(rho, jnp.float32)
    self.stay = jnp.asarray(stay, jnp.float32)
    self.weights = {"instantaneous": jnp.asarray(inst, jnp.float32),
                    "finite-time": jnp.asarray(finite, jnp.float32),
                    "elbo": jnp.asarray(num_steps * rho, jnp.float32)}


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


def _draw(rng: Array, x: Array, process: BlackoutProcess) -> tuple[Array, Array]:
  """k ~ U{1..T} per example and n ~ Binomial(x, p_k) exactly: (int[B], int32 of x's shape)."""
  k_rng, n_rng = jax.random.split(rng)
  k = jax.random.randint(k_rng, (x.shape[0],), 1, process.num_steps + 1)
  return k, thin(n_rng, x, _per_example(process.p, k, x.ndim))


def _per_image(values: Array) -> Array:
  """Sum over every axis but the first: float[B]."""
  return values.reshape(values.shape[0], -1).sum(axis=-1)


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
    weighting: "instantaneous", "finite-time" or "elbo" (= nelbo minus a rate-free constant).
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")
  x = x.astype(jnp.int32)
  k, n = _draw(rng, x, process)
  lam = rate_fn(n, k).astype(jnp.float32)
  return process.weights[weighting][k] * _per_image(poisson_loss(lam, (x - n).astype(jnp.float32)))


def _binomial_mean(fn: Callable[[Array], Array], total: Array, prob: Array,
                   max_count: int) -> Array:
  """E[fn(u)] for u ~ Binomial(total, prob) elementwise, by exact summation over u = 0..N.

  `total` is int in 0..max_count; `prob` in [0, 1] broadcasts against it; one lax.fori_loop.
  """
  total = total.astype(jnp.float32)
  prob = jnp.broadcast_to(prob, total.shape)
  log_norm = gammaln(total + 1.0)

  def add(u, acc):
    u = jnp.asarray(u, jnp.float32)
    rest = jnp.maximum(total - u, 0.0)
    log_pmf = (log_norm - gammaln(u + 1.0) - gammaln(rest + 1.0)
               + xlogy(u, prob) + xlogy(rest, 1.0 - prob))
    return acc + jnp.where(u <= total, jnp.exp(log_pmf) * fn(u), 0.0)

  return jax.lax.fori_loop(0, max_count + 1, add, jnp.zeros(total.shape, jnp.float32))


def nelbo(rate_fn: RateFn, x: Array, rng: Array, process: BlackoutProcess) -> Array:
  """Negative ELBO of the tau-leaping chain in nats per example: float[B] (docs/bounds.md).

  The model: n_T ~ Binomial(N, p_T) per pixel channel (the law of a white pixel at t_end; the
  sampler starts from its mode, the black image), then n_{k-1} = n_k + Poisson(lam rho_k) with
  lam = max(rate_fn(n_k, k), LOG_FLOOR). Its NELBO under the forward process is

      KL(Binomial(x, p_T) || Binomial(N, p_T)) + sum_k E_{n_k ~ Binomial(x, p_k)} KL_k,
      KL_k = KL(Binomial(m, rho_k) || Poisson(lam rho_k))                      (m = x - n_k)
           = rho_k (lam - m log lam) + log m! + m s log s - E_{u ~ Binomial(m, s)} log u!,

  with s = 1 - rho_k. Estimated as T KL_k + the prior KL with k and n drawn like `loss` (same
  rng, same draw: nelbo - loss(weighting="elbo") does not depend on the rate), the rate-free
  parts summed exactly over u. It also bounds the sampler's clipped chain (clipping only adds
  mass at N).
  """
  x = x.astype(jnp.int32)
  k, n = _draw(rng, x, process)
  lam = jnp.maximum(rate_fn(n, k).astype(jnp.float32), LOG_FLOOR)
  m = (x - n).astype(jnp.float32)
  stay = _per_example(process.stay, k, x.ndim)
  log_fact = lambda u: gammaln(u + 1.0)
  births = (_per_example(process.rho, k, x.ndim) * poisson_loss(lam, m) + log_fact(m)
            + xlogy(m * stay, stay) - _binomial_mean(log_fact, m, stay, process.max_count))
  big_n, p_end = process.max_count, process.p[-1]
  xf = x.astype(jnp.float32)
  # log Binomial(u; x, p_T) / Binomial(u; N, p_T) = log C(x, u) / C(N, u) + (x - N) log(1 - p_T)
  log_choose_ratio = lambda u: (gammaln(xf + 1.0) - gammaln(jnp.maximum(xf - u, 0.0) + 1.0)
                                - gammaln(big_n + 1.0) + gammaln(big_n - u + 1.0))
  prior = (_binomial_mean(log_choose_ratio, x, p_end, big_n)
           + (xf - big_n) * jnp.log1p(-p_end))
  return process.num_steps * _per_image(births) + _per_image(prior)


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
