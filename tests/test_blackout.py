"""Blackout Diffusion: the time grid, the death process, the loss's minimiser and the samplers.

Oracle: one pixel channel with a known count distribution PI over {0..N}; pixels are
independent, so many pixels are many independent samples. The exact rate is the posterior mean
E[x - n_k | n_k = n], a table over (k, n).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4.diffusion import blackout

N = 5
PI = np.array([0.3, 0.05, 0.1, 0.25, 0.05, 0.25])  # a lumpy count distribution on {0..N}


def binom_pmf(n, total, p):
  """Binomial(total, p) pmf at n, elementwise with broadcasting (0 outside 0..total)."""
  n, total, p = np.broadcast_arrays(n, total, p)
  comb = np.vectorize(lambda a, b: math.comb(b, a) if 0 <= a <= b else 0)(n, total)
  return comb * p ** n * (1 - p) ** np.maximum(total - n, 0)


def posterior_mean_table(process: blackout.BlackoutProcess, pi: np.ndarray) -> np.ndarray:
  """E[x - n | n_k = n] for k = 0..T, n = 0..N: float64[T + 1, N + 1]."""
  counts = np.arange(len(pi))
  p = np.asarray(process.p, np.float64)[:, None, None]
  # joint[k, x, n] = pi(x) Binomial(n; x, p_k)
  joint = pi[None, :, None] * binom_pmf(counts[None, None, :], counts[None, :, None], p)
  births = counts[None, :, None] - counts[None, None, :]
  return (joint * births).sum(1) / np.maximum(joint.sum(1), 1e-300)


def table_rate_fn(table: np.ndarray):
  """rate_fn looking up table[k, n] for n: int[B, ...], k: int[B]."""
  table = jnp.asarray(table, jnp.float32)

  def rate_fn(n, k):
    return table[k.reshape(k.shape + (1,) * (n.ndim - 1)), n]

  return rate_fn


def test_time_grid():
  T, t_end = 50, 10.0
  process = blackout.BlackoutProcess(T, t_end, N)
  p, t = np.asarray(process.p, np.float64), np.asarray(process.t, np.float64)
  assert p.shape == (T + 1,) and p[0] == 1 and t[0] == 0
  np.testing.assert_allclose(p, np.exp(-t), rtol=1e-6)
  assert np.all(np.diff(p) < 0)
  np.testing.assert_allclose([t[1], p[T], t[T]], [np.exp(-t_end), np.exp(-t_end), t_end],
                             rtol=1e-4)  # t_1 = -log(1 - e^{-t_end}) ~ e^{-t_end}
  logits = np.log(p[1:]) - np.log1p(-p[1:])
  np.testing.assert_allclose(np.diff(logits), np.diff(logits)[0], rtol=1e-3)  # evenly spaced
  rho = np.asarray(process.rho)
  assert rho[1] == 1 and np.all((rho[2:] > 0) & (rho[2:] < 1))
  finite = np.asarray(process.weights["finite-time"])
  np.testing.assert_allclose(finite.sum(), 1 - np.exp(-t_end), rtol=1e-5)
  # T p_k (t_k - t_{k-1}) / T is a Riemann sum of int_0^t_end e^{-t} dt = 1 - e^{-t_end}.
  inst = np.asarray(process.weights["instantaneous"])
  assert abs(inst.sum() / T - (1 - np.exp(-t_end))) < 0.1
  assert inst[0] == 0 and finite[0] == 0


def test_thin_matches_binomial_and_the_death_process():
  """n_t ~ Binomial(x, e^{-t}) and n_t | n_s ~ Binomial(n_s, p_t / p_s), from particle lifetimes."""
  num, s, t = 200_000, 0.4, 1.1
  x = np.full(num, N)
  # The death process itself: each particle lives an Exp(1) lifetime.
  life = np.random.default_rng(0).exponential(size=(num, N))
  n_s, n_t = (life > s).sum(1), (life > t).sum(1)
  # Binomial thinning as the loss does it.
  thinned = np.asarray(blackout.thin(jax.random.key(0), jnp.asarray(x), np.exp(-t)))
  bridged = np.asarray(blackout.thin(jax.random.key(1), jnp.asarray(n_s), np.exp(s - t)))
  pmf = binom_pmf(np.arange(N + 1), N, np.exp(-t))
  for draws in (n_t, thinned, bridged):
    freq = np.bincount(draws, minlength=N + 1) / num
    z = np.abs(freq - pmf) / np.sqrt(pmf * (1 - pmf) / num)
    assert z.max() < 4.5, (freq, pmf, z)
  # Conditional two-time law from the particle simulation.
  for m in (2, 4):
    sel = n_t[n_s == m]
    freq = np.bincount(sel, minlength=m + 1) / len(sel)
    cond = binom_pmf(np.arange(m + 1), m, np.exp(-(t - s)))
    z = np.abs(freq - cond) / np.sqrt(cond * (1 - cond) / len(sel))
    assert z.max() < 4.5, (m, freq, cond)


@pytest.mark.parametrize("weighting", ["instantaneous", "finite-time"])
def test_loss_is_minimised_at_the_posterior_mean(weighting):
  T, pixels, batch, repeats = 20, 8, 4096, 32
  process = blackout.BlackoutProcess(T, 5.0, N)
  post = posterior_mean_table(process, PI)
  counts = np.arange(N + 1)
  p = np.asarray(process.p, np.float64)[:, None, None]
  joint = PI[None, :, None] * binom_pmf(counts[None, None, :], counts[None, :, None], p)
  births = counts[None, :, None] - counts[None, None, :]  # [1, x, n]
  w = np.asarray(process.weights[weighting], np.float64)

  def exact(table):
    """E_k E_{x, n} w_k sum over pixels (lam - m log lam), by enumeration (k uniform on 1..T)."""
    lam = np.maximum(table, blackout.LOG_FLOOR)[:, None, :]
    point = lam - np.where(births > 0, births * np.log(lam), 0.0)
    per_k = (joint * point).sum((1, 2))
    return pixels * (w[1:] * per_k[1:]).mean()

  best = exact(post)
  for scale in (0.9, 1.1):
    assert exact(post * scale) > best + 1e-4 * abs(best)
  rng = np.random.default_rng(1)
  for _ in range(5):  # random perturbations of every entry
    assert exact(post * np.exp(0.1 * rng.standard_normal(post.shape))) > best

  # The Monte Carlo loss averages to the enumerated expectation.
  rate_fn = table_rate_fn(post)

  @jax.jit
  def batch_mean(key):
    data_key, loss_key = jax.random.split(key)
    x = jax.random.choice(data_key, N + 1, (batch, pixels), p=jnp.asarray(PI))
    return blackout.loss(rate_fn, x, loss_key, process, weighting=weighting).mean()

  means = np.asarray(jax.vmap(batch_mean)(jax.random.split(jax.random.key(3), repeats)))
  mean, se = means.mean(), means.std(ddof=1) / np.sqrt(repeats)
  print(f"{weighting}: exact {best:.4f}, Monte Carlo {mean:.4f} +- {se:.4f}")
  assert abs(mean - best) < 4 * se, (mean, se, best)
  assert se < 0.01 * abs(best)


def total_variation(draws: np.ndarray, pi: np.ndarray) -> float:
  return 0.5 * np.abs(np.bincount(draws.reshape(-1), minlength=len(pi)) / draws.size - pi).sum()


@functools.cache
def oracle_samples(sampler: str, T: int = 1000, shape=(40, 1000)) -> np.ndarray:
  process = blackout.BlackoutProcess(T, 10.0, N)
  rate_fn = table_rate_fn(posterior_mean_table(process, PI))
  run = jax.jit(functools.partial(blackout.sample, rate_fn, process=process, shape=shape,
                                  sampler=sampler))
  return np.asarray(run(jax.random.key(7)))


# 40,000 samples over 6 values: a perfect sampler has E[TV] = 0.0043 (Monte Carlo noise alone).
@pytest.mark.parametrize("sampler", ["tau_leaping", "bridge_stochastic"])
def test_oracle_samplers_converge(sampler):
  draws = oracle_samples(sampler)
  assert draws.min() >= 0 and draws.max() <= N
  tv = total_variation(draws, PI)
  print(f"{sampler}: TV = {tv:.4f}")
  assert tv < 0.012, tv


def test_rounding_bridge_is_biased():
  tv_round = total_variation(oracle_samples("bridge"), PI)
  tv_stochastic = total_variation(oracle_samples("bridge_stochastic"), PI)
  print(f"bridge: TV = {tv_round:.4f} (stochastic rounding {tv_stochastic:.4f})")
  assert tv_round > 0.03 and tv_round > 3 * tv_stochastic, (tv_round, tv_stochastic)
