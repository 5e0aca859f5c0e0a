"""Blackout Diffusion: the time grid, the death process, the loss's minimiser and the samplers.

Oracle: one pixel channel with a known count distribution PI over {0..N}; pixels are
independent, so many pixels are many independent samples. The exact rate is the posterior mean
E[x - n_k | n_k = n], a table over (k, n).
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import config_lib
from md4.diffusion import blackout
from md4.methods import image

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


@pytest.mark.parametrize("weighting", ["instantaneous", "finite-time",
                                       pytest.param("elbo", marks=pytest.mark.slow)])
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
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_oracle_samplers_converge(sampler):
  draws = oracle_samples(sampler)
  assert draws.min() >= 0 and draws.max() <= N
  tv = total_variation(draws, PI)
  print(f"{sampler}: TV = {tv:.4f}")
  assert tv < 0.012, tv


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_rounding_bridge_is_biased():
  tv_round = total_variation(oracle_samples("bridge"), PI)
  tv_stochastic = total_variation(oracle_samples("bridge_stochastic"), PI)
  print(f"bridge: TV = {tv_round:.4f} (stochastic rounding {tv_stochastic:.4f})")
  assert tv_round > 0.03 and tv_round > 3 * tv_stochastic, (tv_round, tv_stochastic)


# The ELBO of the tau-leaping chain, by enumerating every path of the death process of one
# pixel channel (N = 2): shares no code with blackout.nelbo beyond the grid p_k.
SMALL_N = 2
SMALL_PI = np.array([0.5, 0.15, 0.35])


def poisson_pmf(j: int, mean: float) -> float:
  return math.exp(-mean) * mean ** j / math.factorial(j) if j >= 0 else 0.0


def birth_probs(p: np.ndarray) -> np.ndarray:
  """The model's per-step birth probability (p_{k-1} - p_k) / (1 - p_k), k = 1..T (entry 0: 0)."""
  return np.concatenate([[0.0], (p[:-1] - p[1:]) / (1 - p[1:])])


def enumerated_nelbo(p: np.ndarray, table: np.ndarray, x: int) -> float:
  """E_q[log q(n_{1:T} | x) - log p(x, n_{1:T})] over every path x >= n_1 >= ... >= n_T >= 0,
  q the death process (n_k | n_{k-1} ~ Binomial(n_{k-1}, p_k / p_{k-1})), p the chain
  n_T ~ Binomial(N, p_T), n_{k-1} = n_k + Poisson(table[k, n_k] rho_k)."""
  T, rho = len(p) - 1, birth_probs(p)
  total = 0.0
  for path in itertools.product(range(x + 1), repeat=T):
    n = (x, *path)
    if list(n) != sorted(n, reverse=True):
      continue
    log_q = sum(math.log(binom_pmf(n[k], n[k - 1], p[k] / p[k - 1])) for k in range(1, T + 1))
    log_p = math.log(binom_pmf(n[T], SMALL_N, p[T])) + sum(
        math.log(poisson_pmf(n[k - 1] - n[k], table[k, n[k]] * rho[k])) for k in range(1, T + 1))
    total += math.exp(log_q) * (log_q - log_p)
  return total


def model_law(p: np.ndarray, table: np.ndarray, clip: bool) -> np.ndarray:
  """The chain's law of n_0 on {0..N}: births past N are dropped, or kept at N when `clip` (the
  sampler's chain)."""
  T, rho = len(p) - 1, birth_probs(p)
  law = np.array([binom_pmf(n, SMALL_N, p[T]) for n in range(SMALL_N + 1)], np.float64)
  for k in range(T, 0, -1):
    new = np.zeros_like(law)
    for n in range(SMALL_N + 1):
      births = [poisson_pmf(j - n, table[k, n] * rho[k]) for j in range(SMALL_N + 1)]
      new += law[n] * np.array(births)
      if clip:
        new[SMALL_N] += law[n] * (1 - sum(births))
    law = new
  return law


def small_process(T: int = 4) -> blackout.BlackoutProcess:
  return blackout.BlackoutProcess(T, 3.0, SMALL_N)  # p_T = 0.05: the prior term is not negligible


def test_nelbo_equals_the_enumerated_elbo_and_bounds_the_likelihood():
  process = small_process()
  p = np.asarray(process.p, np.float64)
  table = posterior_mean_table(process, SMALL_PI)
  exact = np.array([enumerated_nelbo(p, table, x) for x in range(SMALL_N + 1)])
  # A bound on the chain's likelihood, and on the sampler's clipped chain (which is at least as
  # likely), hence on the data entropy in the mean.
  nll = -np.log(model_law(p, table, clip=False))
  nll_clipped = -np.log(model_law(p, table, clip=True))
  entropy = -(SMALL_PI * np.log(SMALL_PI)).sum()
  print(f"NELBO {exact}, -log p {nll}, clipped {nll_clipped}; E_pi: NELBO "
        f"{SMALL_PI @ exact:.6f} >= -log p {SMALL_PI @ nll:.6f} >= H {entropy:.6f}")
  assert np.all(exact >= nll - 1e-12) and np.all(nll >= nll_clipped - 1e-12)
  assert np.all(exact[1:] > nll[1:] + 0.02)  # x = 0 has one path: the bound is tight there
  assert SMALL_PI @ exact > SMALL_PI @ nll_clipped > entropy

  # Monte Carlo through the image method's held-out metrics: 1 x 2 images over every pair of
  # values, many draws each; nats per image and bits per dimension.
  config = config_lib.base()
  config.model_type, config.image_shape = "blackout", (1, 2, 1)
  config.blackout.update(num_steps=process.num_steps, t_end=process.t_end, max_count=SMALL_N)
  method = image.Blackout(config, SMALL_N + 1)
  method.rate_fn = lambda params, rng, train: table_rate_fn(table)
  pairs = np.array(list(itertools.product(range(SMALL_N + 1), repeat=2)))
  reps = 4000
  x = jnp.asarray(np.tile(pairs, (reps, 1)).reshape(-1, *config.image_shape))
  metrics = jax.jit(lambda key: method.evaluate(None, x, key))(jax.random.key(0))
  values = np.asarray(metrics["nelbo"], np.float64).reshape(reps, len(pairs))
  np.testing.assert_allclose(metrics["nelbo_bits_per_dim"],
                             metrics["nelbo"] / (2 * math.log(2)), rtol=1e-6)
  mean, se = values.mean(0), values.std(0, ddof=1) / math.sqrt(reps)
  target = exact[pairs].sum(1)
  print("pairs", pairs.tolist(), "Monte Carlo", mean, "+-", se, "enumerated", target)
  assert np.all(np.abs(mean - target) < 4 * se), (mean, se, target)


def expected_loss(process, table, weights, x: int) -> float:
  """E_k E_{n ~ Binomial(x, p_k)} w_k (lam - m log lam), k ~ U{1..T}, by enumeration."""
  T, p = process.num_steps, np.asarray(process.p, np.float64)
  return sum(binom_pmf(n, x, p[k]) * weights[k] * (table[k, n] - (x - n) * math.log(table[k, n]))
             for k in range(1, T + 1) for n in range(x + 1)) / T


def test_elbo_weighting_is_the_nelbo_up_to_a_rate_free_constant(T=4):
  process = small_process(T)
  p = np.asarray(process.p, np.float64)
  rng = np.random.default_rng(T)
  tables = [np.exp(rng.normal(0.0, 1.0, (T + 1, SMALL_N + 1))) for _ in range(3)]
  exact = np.array([[enumerated_nelbo(p, tab, x) for x in range(SMALL_N + 1)] for tab in tables])
  gaps = {w: exact - np.array([[
      expected_loss(process, tab, np.asarray(process.weights[w], np.float64), x)
      for x in range(SMALL_N + 1)] for tab in tables]) for w in blackout.WEIGHTINGS}
  print({w: g.round(6).tolist() for w, g in gaps.items()})
  np.testing.assert_allclose(gaps["elbo"], gaps["elbo"][:1].repeat(3, 0), atol=1e-5)
  for w in ("instantaneous", "finite-time"):  # a reweighted ELBO, not a bound
    assert np.ptp(gaps[w], axis=0).max() > 0.1, (w, gaps[w])

  # The same draw: nelbo - loss("elbo") does not depend on the rate, example by example.
  x = jnp.asarray(rng.integers(0, SMALL_N + 1, (512, 2)))

  @jax.jit
  def difference(table):
    rate_fn, key = table_rate_fn(table), jax.random.key(1)
    return (blackout.nelbo(rate_fn, x, key, process)
            - blackout.loss(rate_fn, x, key, process, weighting="elbo"))

  diffs = [np.asarray(difference(tab)) for tab in tables]
  np.testing.assert_allclose(diffs[1], diffs[0], atol=2e-4)
  np.testing.assert_allclose(diffs[2], diffs[0], atol=2e-4)
