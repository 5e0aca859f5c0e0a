"""GenMD4 exactness: NELBO, RLOO gradient and sampler against enumeration on a tiny problem."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4.diffusion import genmd4, masked
from md4.diffusion.schedules import EPS, get_schedule
from tests import genmd4_oracle, oracle

V, L = 3, 3
P = oracle.random_distribution(0, V, L)
# The most and a less likely sequence.
SEQS = [np.unravel_index(k, P.shape) for k in (np.argmax(P), np.argsort(P.reshape(-1))[5])]

_TABLE_RNG = np.random.default_rng(3)
_TABLE = jnp.asarray(_TABLE_RNG.normal(size=(2, (V + 1) ** L, L, V)), jnp.float32)


def table_logits_fn(z, t):
  """A fixed, non-oracle, time-dependent network: random logits per (state, position)."""
  k = oracle.state_index(z, V + 1)
  return _TABLE[0][k] + t[:, None, None] * _TABLE[1][k]


def mean_and_se(batch_fn, repeats, seed):
  """Mean and standard error over `repeats` independent batches of batch_fn(rng) -> scalar."""
  values = np.asarray(jax.vmap(jax.jit(batch_fn))(jax.random.split(jax.random.key(seed),
                                                                    repeats)))
  return values.mean(), values.std(ddof=1) / np.sqrt(repeats)


def genmd4_nelbo_stats(logits_fn, x, w, batch=256, repeats=200, seed=1):
  xs = jnp.tile(jnp.asarray(x)[None], (batch, 1))
  return mean_and_se(lambda rng: genmd4.loss(logits_fn, xs, rng, w, vocab_size=V)[1].mean(),
                     repeats, seed)


def test_init_and_alpha():
  np.testing.assert_allclose(jax.nn.softplus(genmd4.init_w_raw(V)), np.ones(V), rtol=1e-6)
  w = jnp.array([0.5, 1.0, 2.0])
  a = genmd4.alpha(jnp.array([0.0, 0.25, 1.0]), w)  # [3, V]
  np.testing.assert_allclose(a[0], 1.0)
  np.testing.assert_allclose(a[1], 1 - (1 - EPS) * 0.25 ** np.array([0.5, 1.0, 2.0]), rtol=1e-6)
  np.testing.assert_allclose(a[2], EPS, rtol=1e-3)


@pytest.mark.parametrize("name", ["table", "oracle"])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_unit_exponents_match_md4_linear(name):
  # w = 1 is MD4's linear schedule; the two differ only by O(eps) clamping (MD4's alpha(0) =
  # 1 - eps: its reconstruction term, L eps log V), 3e-4 nats here.
  logits_fn = table_logits_fn if name == "table" else oracle.masked_oracle(P)
  x = SEQS[1]
  gen, gen_se = genmd4_nelbo_stats(logits_fn, x, jnp.ones(V))
  xs = jnp.tile(jnp.asarray(x)[None], (256, 1))
  md4, md4_se = mean_and_se(lambda rng: masked.nelbo(logits_fn, xs, rng, get_schedule("linear"),
                                                     vocab_size=V).mean(), 200, 2)
  assert abs(gen - md4) < 4 * np.hypot(gen_se, md4_se) + 0.01, (gen, gen_se, md4, md4_se)
  assert gen_se < 0.01 * gen
  # The exact expectation (enumeration + quadrature) agrees too.
  exact = genmd4_oracle.expected_nelbo(logits_fn, np.array(x), jnp.ones(V), vocab_size=V)
  assert abs(gen - exact) < 4 * gen_se, (gen, gen_se, float(exact))


ORACLE_W = jnp.array([0.7, 1.6, 1.1])
ORACLE_FN = genmd4_oracle.posterior_oracle(P, ORACLE_W)


@pytest.mark.parametrize("x", SEQS)
def test_oracle_nelbo_equals_negative_log_likelihood(x):
  target = -np.log(P[x])
  # The exact gap: only the prior at t = 1 replaces the true q(z_1) (the integral reaches
  # t = 0, where nothing is masked); |gap| < L eps log V = 3.3e-4 nats.
  gap = genmd4_oracle.oracle_gap(P, x, np.asarray(ORACLE_W))
  assert abs(gap) < L * np.log(V) * EPS, gap
  # Exact expectation of the estimator: equals -log p(x) + gap to float32 precision (this pins
  # down the integrand, the eps handling and the boundary terms).
  exact = genmd4_oracle.expected_nelbo(ORACLE_FN, np.array(x), ORACLE_W, vocab_size=V)
  np.testing.assert_allclose(float(exact), target + gap, rtol=1e-5)
  # Monte Carlo mean of genmd4.loss's NELBO.
  mean, se = genmd4_nelbo_stats(ORACLE_FN, x, ORACLE_W)
  assert abs(mean - (target + gap)) < 4 * se, (mean, se, target, gap)
  assert se < 0.01 * target


@pytest.mark.parametrize("seed, w", [(1, (0.3, 1.0, 3.0)), (2, (3.0, 0.3, 0.6)),
                                     (3, (1.5, 3.0, 0.3))])
def test_oracle_nelbo_is_tight_for_exponents_from_0_3_to_3(seed, w):
  """With exponents below 1 the bound cut at t1 = 1e-3 left t1^0.3 = 13% of a token masked and
  coded it uniformly: 0.12-0.26 nats above -log p(x) here. The integral down to t = 0 is tight."""
  p = oracle.random_distribution(seed, V, L)
  w = jnp.asarray(w)
  logits_fn = genmd4_oracle.posterior_oracle(p, w)
  x = np.unravel_index(np.argsort(p.reshape(-1))[-3 * seed], p.shape)
  target = -np.log(p[x])
  mean, se = genmd4_nelbo_stats(logits_fn, x, w, repeats=100, seed=seed)
  print(f"mean {mean:.4f} +- {se:.4f}, -log p(x) {target:.4f}")
  assert abs(mean - target) < 4 * se + 0.01, (mean, se, target)
  assert se < 0.015 * target, (se, target)
  exact = genmd4_oracle.expected_nelbo(logits_fn, np.array(x), w, vocab_size=V)
  np.testing.assert_allclose(float(exact), target, atol=L * EPS * np.log(V), rtol=1e-5)


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_rloo_gradient_is_unbiased():
  w_raw = jnp.array([1.5, 0.2, 0.8])  # w = softplus(w_raw) = [1.70, 0.80, 1.17]
  x = np.array([2, 0, 1])
  exact_value, exact_grad = jax.value_and_grad(lambda r: genmd4_oracle.expected_nelbo(
      table_logits_fn, x, jax.nn.softplus(r), vocab_size=V))(w_raw)
  xs = jnp.tile(jnp.asarray(x)[None], (256, 1))

  def batch(w_raw, rng):
    surrogate, nelbo = genmd4.loss(table_logits_fn, xs, rng, jax.nn.softplus(w_raw), vocab_size=V)
    return jnp.stack([surrogate.mean(), nelbo.mean()])

  jac = jax.jit(jax.vmap(jax.jacrev(batch), in_axes=(None, 0)))
  repeats = 1000
  grads = np.asarray(jac(w_raw, jax.random.split(jax.random.key(4), repeats)))  # [R, 2, V]
  mean, se = grads.mean(0), grads.std(0, ddof=1) / np.sqrt(repeats)
  z_rloo = (mean[0] - exact_grad) / se[0]
  assert np.all(np.abs(z_rloo) < 4), (mean[0], se[0], exact_grad)
  assert np.all(se[0] < 0.1 * np.abs(exact_grad)), (se[0], exact_grad)
  # Differentiating the NELBO estimate alone (no score-function term) is visibly biased.
  z_naive = (mean[1] - exact_grad) / se[1]
  assert np.max(np.abs(z_naive)) > 20, z_naive
  # And the NELBO estimate itself is unbiased.
  nelbo_mean, nelbo_se = genmd4_nelbo_stats(table_logits_fn, x, jax.nn.softplus(w_raw))
  assert abs(nelbo_mean - exact_value) < 4 * nelbo_se, (nelbo_mean, nelbo_se, exact_value)


SAMPLER_W = jnp.array([0.5, 1.0, 2.5])


def draw(logits_fn, num_samples=20000, num_steps=100, **kw):
  fn = jax.jit(functools.partial(genmd4.sample, logits_fn, w=SAMPLER_W, batch_size=num_samples,
                                 seq_len=L, vocab_size=V, num_steps=num_steps, **kw))
  return np.asarray(fn(jax.random.key(7)))


def test_sampler_reproduces_p():
  samples = draw(genmd4_oracle.posterior_oracle(P, SAMPLER_W))
  assert samples.min() >= 0 and samples.max() < V  # no mask left
  tv = oracle.total_variation(samples, P)
  assert tv < 0.05 and tv < 3 * oracle.expected_tv(P, len(samples)), tv
  # The posterior must account for value-dependent masking: MD4's oracle (which ignores it)
  # drives the same sampler far from p.
  wrong = oracle.total_variation(draw(oracle.masked_oracle(P), num_samples=4000), P)
  assert wrong > 0.2, wrong


def test_sampler_conditions_on_known_tokens():
  known = jnp.array([0, 2, 0])
  known_mask = jnp.array([False, True, False])
  samples = draw(genmd4_oracle.posterior_oracle(P, SAMPLER_W), known=known,
                 known_mask=known_mask)
  assert np.all(samples[:, 1] == 2)
  conditional = np.zeros_like(P)
  conditional[:, 2:3, :] = P[:, 2:3, :] / P[:, 2, :].sum()
  tv = oracle.total_variation(samples, conditional)
  assert tv < 0.05 and tv < 3 * oracle.expected_tv(conditional, len(samples)), tv


def test_sampler_top_p_tiny_is_greedy_on_one_step():
  # One step from all-mask: each token is the mode of its posterior at t = 1, where every
  # token is masked with the same probability, i.e. the mode of its marginal under p.
  samples = draw(genmd4_oracle.posterior_oracle(P, SAMPLER_W), num_samples=64, num_steps=1,
                 top_p=1e-6)
  modes = [np.argmax(P.sum(axis=tuple(a for a in range(L) if a != n))) for n in range(L)]
  assert np.all(samples == np.array(modes))
