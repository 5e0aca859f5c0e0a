"""GGM exactness on V = L = 3 with a random p over all 27 sequences (docs/methods.md §3)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4.diffusion import glauber
from md4.diffusion.schedules import get_schedule
from tests import ggm_oracle as go
from tests import oracle

V, L = 3, 3
P = oracle.random_distribution(0, V, L)
PROCESS = glauber.GlauberProcess(L, V, 4, "linear")  # T = 12
CLASSIFIER, LOG_Q = go.oracle_tables(P, PROCESS)
SEQS = oracle.all_sequences(V, L)
UNIGRAM = np.array([0.55, 0.3, 0.15])  # a non-uniform noise law u
NOISES = {"uniform": None, "unigram": UNIGRAM}


def tv(a: np.ndarray, b: np.ndarray) -> float:
  return 0.5 * float(np.abs(a - b).sum())


def empirical(samples: np.ndarray) -> np.ndarray:
  index = np.asarray(oracle.state_index(jnp.asarray(samples), V))
  return (np.bincount(index, minlength=V**L) / len(index)).reshape((V,) * L)


def draw_data(seed: int, n: int) -> jnp.ndarray:
  """n sequences drawn from p: int[n, L]."""
  rows = np.random.default_rng(seed).choice(V**L, size=n, p=P.reshape(-1))
  return jnp.asarray(SEQS[rows])


# ---------------------------------------------------------------------------- the process


@pytest.mark.parametrize("name", ["linear", "cosine", "poly2", "geometric"])
@pytest.mark.parametrize("sweeps", [1, 64])
def test_process_constants(name, sweeps):
  process = glauber.GlauberProcess(5, 7, sweeps, get_schedule(name))
  t = jnp.arange(process.num_steps)
  pi = np.asarray(process.keep_prob(t))
  assert np.all((pi > 0) & (pi < 1))
  m = np.asarray(t // 5 + 1, np.float32)
  alpha = get_schedule(name).alpha
  np.testing.assert_allclose(pi, alpha(m / sweeps) / alpha((m - 1) / sweeps), rtol=1e-6)
  c = jnp.arange(sweeps + 1)
  np.testing.assert_allclose(process.survival(c), alpha(c / sweeps) / alpha(0.0), rtol=2e-5,
                             atol=1e-12)
  np.testing.assert_array_equal(process.position(t), np.asarray(t) % 5)
  # c_j(t) counts the steps s < t with s mod L = j, for t = 0..T.
  steps = np.arange(process.num_steps + 1)
  brute = np.array([[np.sum(np.arange(s) % 5 == j) for j in range(5)] for s in steps])
  np.testing.assert_array_equal(process.completed_visits(jnp.asarray(steps)), brute)


@pytest.mark.parametrize("name,sweeps", [("linear", 4), ("cosine", 2), ("geometric", 3)])
def test_closed_form_marginal_equals_chain(name, sweeps):
  """Exact: the telescoped keep probabilities give the law of the step-by-step chain."""
  process = glauber.GlauberProcess(L, V, sweeps, name)
  for t in range(process.num_steps + 1):
    np.testing.assert_allclose(go.closed_form_marginal(P, process, t),
                               go.chain_marginal(P, process, t), atol=1e-6)
  # X_T is uniform up to kappa_K = alpha(1) / alpha(0).
  final = go.closed_form_marginal(P, process, process.num_steps)
  assert tv(final, np.full(final.shape, V ** -L)) < 2 * float(process.survival(sweeps))


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_noise_to_matches_simulated_chain():
  """Monte Carlo: closed-form X_t and a step-by-step simulation both match the exact law."""
  n = 20000
  x = draw_data(0, n)
  steps = jnp.arange(PROCESS.num_steps)

  @jax.jit
  def simulate(rng):
    def step(z, t):
      keep_rng, token_rng = jax.random.split(jax.random.fold_in(rng, t))
      keep = jax.random.uniform(keep_rng, (n,)) < PROCESS.keep_prob(t)
      token = jnp.where(keep, z[:, t % L], jax.random.randint(token_rng, (n,), 0, V))
      z = z.at[:, t % L].set(token)
      return z, z

    _, path = jax.lax.scan(step, x, steps)
    return jnp.concatenate([x[None], path])  # [T + 1, n, L]

  path = np.asarray(simulate(jax.random.key(1)))
  noise_to = jax.jit(PROCESS.noise_to)
  bound = 2 * oracle.expected_tv(np.full(V**L, V ** -L), n)  # E[TV] is largest for uniform
  for t in (0, 1, 4, 7, PROCESS.num_steps):
    exact = go.closed_form_marginal(P, PROCESS, t)
    closed = empirical(noise_to(x, jnp.full((n,), t), jax.random.key(2 + t)))
    chain = empirical(path[t])
    assert tv(closed, exact) < bound, (t, tv(closed, exact), bound)
    assert tv(chain, exact) < bound, (t, tv(chain, exact), bound)
  np.testing.assert_array_equal(noise_to(x, jnp.zeros((n,), jnp.int32), jax.random.key(0)), x)


# ------------------------------------------------------------------- classifier identity


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("name,sweeps", [("linear", 4), ("cosine", 2)])
def test_odds_identity_recovers_reverse_kernel(name, sweeps, noise):
  """q_t(a | x_{-i}) = (Pi_t(a) / pi_t) p_t / (1 - p_t) for every t, context and a."""
  process = glauber.GlauberProcess(L, V, sweeps, name, NOISES[noise])
  for t in range(process.num_steps):
    classifier, q = go.classifier_and_conditional(P, process, t)
    pi, noise = go.keep_prob(process, t), np.asarray(process.noise_prob(t))
    np.testing.assert_allclose(noise / pi * classifier / (1 - classifier), q, atol=1e-5)
    # The joint of (X_t, X_{t+1}) also has the closed-form law of X_{t+1} as its marginal.
    joint, _ = go.step_joint(P, process, t)
    np.testing.assert_allclose(joint.sum(0), go.closed_form_marginal(P, process, t + 1)
                               .reshape(-1), atol=1e-12)


# ------------------------------------------------------------------------------ sampling


def test_exact_law_of_sampler_with_oracle_is_p():
  """Exact: propagating the law through the sampler's T steps returns p (both heads)."""
  assert tv(go.sampler_law(CLASSIFIER, PROCESS), P) < 1e-6
  assert tv(go.sampler_law(LOG_Q, PROCESS), P) < 1e-6


def test_sampler_with_oracle_reproduces_p():
  n = 20000
  rng = jax.random.key(3)
  run = functools.partial(glauber.sample, rng=rng, process=PROCESS, batch_size=n)
  samples = np.asarray(run(go.table_logits_fn(CLASSIFIER, V)))
  distance, expected = tv(empirical(samples), P), oracle.expected_tv(P, n)
  # Measured: TV 0.0133 for an expected Monte Carlo TV of 0.0124.
  assert distance < 0.05 and distance < 1.5 * expected, (distance, expected)
  # A [B, L, V] network output gives the very same samples as its [B, V] query row.
  full = np.asarray(run(go.table_logits_fn(CLASSIFIER, V, full_rows=True)))
  np.testing.assert_array_equal(full, samples)


@functools.cache
def classifier_table(sweeps: int) -> np.ndarray:
  return go.oracle_tables(P, glauber.GlauberProcess(L, V, sweeps, "linear"))[0]


INFILL_PROCESS = glauber.GlauberProcess(L, V, 8, "linear")
INFILL_TABLE = classifier_table(8)
KNOWN = {1: int(np.argmax(P.sum(axis=(0, 2))))}


@pytest.mark.parametrize("renoise", [False, True])
def test_infilling(renoise):
  """Samples follow the sampler's exact law; known tokens never change; close to p(. | x_1).

  Infilling with an unconditional classifier is not exact (the reverse kernels condition on a
  noised, not a clean, known token); its bias falls with the number of sweeps K.
  """
  n = 20000
  known = jnp.zeros((L,), jnp.int32).at[1].set(KNOWN[1])
  known_mask = jnp.arange(L) == 1
  samples = np.asarray(glauber.sample(
      go.table_logits_fn(INFILL_TABLE, V), jax.random.key(4), INFILL_PROCESS, batch_size=n,
      known=known, known_mask=known_mask, renoise_known=renoise))
  assert np.all(samples[:, 1] == KNOWN[1])
  law = go.sampler_law(INFILL_TABLE, INFILL_PROCESS, KNOWN, renoise)
  target = go.conditional(P, KNOWN)
  expected = oracle.expected_tv(law, n)
  assert tv(empirical(samples), law) < 1.5 * expected, (tv(empirical(samples), law), expected)
  # Measured bias TV(law, p(. | x_1)): clamped 0.015, re-noised 0.039 at K = 8.
  assert tv(law, target) < (0.045 if renoise else 0.02)
  assert tv(empirical(samples), target) < 0.05
  biases = [tv(go.sampler_law(classifier_table(k), glauber.GlauberProcess(L, V, k, "linear"),
                              KNOWN, renoise), target) for k in (2, 4)]
  assert biases[0] > biases[1] > tv(law, target)


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_infilling_per_row_mask_keeps_known_tokens():
  known = jnp.asarray(np.random.default_rng(0).integers(0, V, (64, L)), jnp.int32)
  known_mask = jnp.asarray(np.random.default_rng(1).random((64, L)) < 0.5)
  for renoise in (False, True):
    samples = glauber.sample(go.table_logits_fn(CLASSIFIER, V), jax.random.key(5), PROCESS,
                             batch_size=64, known=known, known_mask=known_mask,
                             renoise_known=renoise)
    np.testing.assert_array_equal(jnp.where(known_mask, samples, 0),
                                  jnp.where(known_mask, known, 0))


def test_temperature():
  """A network ignoring its input: each position ends as one draw from softmax(l / tau)."""
  row = jnp.array([0.0, 1.0, 2.0])
  n, tau = 20000, 0.5
  samples = glauber.sample(lambda x_in, t: jnp.broadcast_to(row, (x_in.shape[0], V)),
                           jax.random.key(6), PROCESS, batch_size=n, temperature=tau)
  freq = np.stack([np.bincount(np.asarray(samples[:, j]), minlength=V) / n for j in range(L)])
  target = np.asarray(jax.nn.softmax(row / tau))
  assert np.all(np.abs(freq - target) < 4 * np.sqrt(target * (1 - target) / n))


def test_sample_jit_shapes():
  logits_fn = go.table_logits_fn(CLASSIFIER, V)
  run = jax.jit(functools.partial(glauber.sample, logits_fn, process=PROCESS, batch_size=5))
  samples = run(jax.random.key(7))
  assert samples.shape == (5, L) and samples.dtype == jnp.int32
  assert int(samples.min()) >= 0 and int(samples.max()) < V
  np.testing.assert_array_equal(run(jax.random.key(7)), samples)


# --------------------------------------------------------------------------------- losses


def loss_stats(table, kind, n=1 << 16, seed=0):
  """Per-example library losses on x ~ p: float[n] (numpy)."""
  fn = jax.jit(functools.partial(glauber.loss, go.table_logits_fn(table, V), process=PROCESS,
                                 kind=kind))
  return np.asarray(fn(draw_data(seed, n), jax.random.key(seed)), np.float64)


def mean_se(values):
  return values.mean(), values.std(ddof=1) / np.sqrt(len(values))


RANDOM_TABLE = np.random.default_rng(2).normal(0.0, 2.0, CLASSIFIER.shape).astype(np.float32)


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_soft_and_hard_losses_have_the_same_expectation():
  exact = go.expected_losses(P, PROCESS, RANDOM_TABLE)["soft"]
  soft, hard = loss_stats(RANDOM_TABLE, "soft"), loss_stats(RANDOM_TABLE, "hard")
  # The same key draws the same t and X_t: hard - soft has conditional mean zero.
  diff_mean, diff_se = mean_se(hard - soft)
  assert abs(diff_mean) < 4 * diff_se, (diff_mean, diff_se)
  for values in (soft, hard):
    mean, se = mean_se(values)
    assert abs(mean - exact) < 4 * se, (mean, se, exact)
  assert soft.std() < hard.std()


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_oracle_minimises_soft_loss():
  """Exact expected soft loss: the oracle beats every perturbation (small and large)."""
  best = go.expected_losses(P, PROCESS, CLASSIFIER)["soft"]
  rng = np.random.default_rng(3)
  for scale in (1e-2, 0.3, 2.0):
    for _ in range(4):
      perturbed = CLASSIFIER + scale * rng.normal(size=CLASSIFIER.shape).astype(np.float32)
      assert go.expected_losses(P, PROCESS, perturbed)["soft"] > best
  for shift in (-0.1, 0.1):
    assert go.expected_losses(P, PROCESS, CLASSIFIER + shift)["soft"] > best
  # The library's Monte Carlo loss agrees with the enumeration at the oracle too.
  mean, se = mean_se(loss_stats(CLASSIFIER, "soft", seed=1))
  assert abs(mean - best) < 4 * se, (mean, se, best)


def test_ce_loss_at_oracle_is_conditional_entropy():
  entropy = go.conditional_entropy(P, PROCESS)
  assert abs(go.expected_losses(P, PROCESS, LOG_Q)["ce"] - entropy) < 1e-5
  # softmax(logit p_t) = q_t as well: the classifier bank is also a reverse-kernel head.
  assert abs(go.expected_losses(P, PROCESS, CLASSIFIER)["ce"] - entropy) < 1e-5
  mean, se = mean_se(loss_stats(LOG_Q, "ce", seed=2))
  assert abs(mean - entropy) < 4 * se, (mean, se, entropy)


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_loss_shapes_and_query_row():
  x = draw_data(5, 32)

  def query_checking_fn(x_in, t):  # NaN unless the query id sits at i_t and nowhere else
    ok = jnp.all((x_in == V) == (jnp.arange(L) == PROCESS.position(t)[:, None]))
    return jnp.where(ok, 0.0, jnp.nan) * jnp.ones((x_in.shape[0], V))

  @jax.jit
  def all_losses(rng):
    values = {(kind, rows): glauber.loss(go.table_logits_fn(RANDOM_TABLE, V, rows), x, rng,
                                         PROCESS, kind=kind)
              for kind in glauber.LOSS_KINDS for rows in (False, True)}
    return values, glauber.loss(query_checking_fn, x, rng, PROCESS)

  values, checked = all_losses(jax.random.key(8))
  for kind in glauber.LOSS_KINDS:
    row, full = values[kind, False], values[kind, True]
    assert row.shape == (32,) and row.dtype == jnp.float32
    assert np.all(np.isfinite(row)) and np.all(row >= 0)
    np.testing.assert_allclose(row, full, rtol=1e-6)
  assert np.all(np.isfinite(checked))
  with pytest.raises(ValueError):
    glauber.loss(query_checking_fn, x, jax.random.key(8), PROCESS, kind="mse")


POSITION_TABLE = np.random.default_rng(4).normal(
  0.0, 2.0, (PROCESS.num_steps, (V + 1) ** L, L, V)).astype(np.float32)


@pytest.mark.parametrize("queries", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_several_queries_loss_matches_enumeration(queries):
  """Q visits per pass: the Monte Carlo mean of each kind equals the enumerated expectation of
  the simulated visits (soft is hard's expectation), with a network whose logits differ by
  position and by the set of queried positions."""
  exact = go.expected_query_losses(P, PROCESS, POSITION_TABLE, queries)
  fn = jax.jit(lambda x, rng, kind: glauber.loss(
    go.position_table_logits_fn(POSITION_TABLE, V), x, rng, PROCESS, kind=kind,
    queries=queries), static_argnums=2)
  x = draw_data(11, 1 << 15)
  for kind, target in (("soft", exact["hard"]), ("hard", exact["hard"]), ("ce", exact["ce"])):
    mean, se = mean_se(np.asarray(fn(x, jax.random.key(12), kind), np.float64))
    assert abs(mean - target) < 4 * se, (kind, mean, se, target)
  # A batch mixing rows of one visit and rows of Q visits (`counts`): each kind of row on its own.
  counts = jnp.where(jnp.arange(len(x)) % 2 == 1, queries, 1)
  mixed = np.asarray(jax.jit(lambda x, rng: glauber.loss(
    go.position_table_logits_fn(POSITION_TABLE, V), x, rng, PROCESS, queries=queries,
    counts=counts))(x, jax.random.key(13)), np.float64)
  single = go.expected_query_losses(P, PROCESS, POSITION_TABLE, 1)["hard"]
  for values, target in ((mixed[0::2], single), (mixed[1::2], exact["hard"])):
    mean, se = mean_se(values)
    assert abs(mean - target) < 4 * se, (mean, se, target)
  with pytest.raises(ValueError, match="queries"):
    glauber.loss(go.position_table_logits_fn(POSITION_TABLE, V), x, jax.random.key(0), PROCESS,
                 queries=L + 1)


def test_stratified_steps_cover_all_steps():
  t = np.asarray(glauber.stratified_steps(jax.random.key(9), 24, PROCESS.num_steps))
  np.testing.assert_array_equal(np.bincount(t, minlength=12), np.full(12, 2))


@pytest.mark.parametrize("name, sweeps", [("linear", 4096), ("geometric", 256)])
def test_noise_prob_is_accurate_when_visits_keep_almost_everything(name, sweeps):
  # Many sweeps: pi = alpha(m/K) / alpha((m-1)/K) is close to 1 (1 - pi ~ 2e-4 and 5e-6 here),
  # where 1 - pi in float32 keeps only a few digits; the closed-form 1 - alpha keeps them.
  seq_len, vocab_size = 2, 3
  process = glauber.GlauberProcess(seq_len, vocab_size, sweeps, get_schedule(name))
  m = np.arange(1, 9, dtype=np.float64)
  if name == "linear":
    alpha = lambda t: 1e-4 + (1 - 2e-4) * (1 - t)
  else:
    alpha = lambda t: np.exp(-1e-4 * (20 / 1e-4) ** t)
  expected = (alpha((m - 1) / sweeps) - alpha(m / sweeps)) / alpha((m - 1) / sweeps)
  assert expected.min() > 2 * (1 - glauber.PI_MAX)  # not clipped
  t = jnp.asarray((m - 1) * seq_len, jnp.int32)  # the first step of visit m
  np.testing.assert_allclose(process.noise_mass(t), expected, rtol=2e-5)
  np.testing.assert_allclose(process.noise_prob(t) * vocab_size, expected[:, None] * np.ones(3),
                             rtol=2e-5)


@pytest.mark.parametrize("name, sweeps", [("linear", 4096), ("geometric", 256)])
def test_survival_complement_is_accurate_when_kappa_is_close_to_one(name, sweeps):
  # 1 - kappa_c after the first few of many visits (~2e-4 c and ~5e-6 c here): float32
  # 1 - kappa keeps only a few digits; the closed-form 1 - alpha keeps them.
  process = glauber.GlauberProcess(2, 3, sweeps, get_schedule(name))
  c = np.arange(0, 9, dtype=np.float64)
  if name == "linear":
    alpha = lambda t: 1e-4 + (1 - 2e-4) * (1 - t)
  else:
    alpha = lambda t: np.exp(-1e-4 * (20 / 1e-4) ** t)
  expected = (alpha(0.0) - alpha(c / sweeps)) / alpha(0.0)
  complement = np.asarray(process.survival_complement(jnp.asarray(c, jnp.int32)), np.float64)
  assert complement[0] == 0
  np.testing.assert_allclose(complement[1:], expected[1:], rtol=2e-5)
  subtracted = 1 - np.asarray(process.survival(jnp.asarray(c, jnp.int32)), np.float64)
  print(f"{name}: max relative error, closed form "
        f"{np.max(np.abs(complement[1:] / expected[1:] - 1)):.2e}, "
        f"1 - kappa {np.max(np.abs(subtracted[1:] / expected[1:] - 1)):.2e}")


# ------------------------------------------------------------------ noise law u (unigram)

UNI_PROCESS = glauber.GlauberProcess(L, V, 4, "linear", UNIGRAM)
UNI_CLASSIFIER, UNI_LOG_Q = go.oracle_tables(P, UNI_PROCESS)


def test_noise_law_draws_and_validation():
  n = 200000
  draws = np.asarray(UNI_PROCESS.draw_noise(jax.random.key(10), (n,)))
  freq = np.bincount(draws, minlength=V) / n
  assert np.all(np.abs(freq - UNIGRAM) < 4 * np.sqrt(UNIGRAM * (1 - UNIGRAM) / n)), freq
  np.testing.assert_allclose(UNI_PROCESS.noise_prob(jnp.arange(3)).sum(-1),
                             UNI_PROCESS.noise_mass(jnp.arange(3)), rtol=1e-6)
  for bad in (np.array([0.5, 0.5, 0.0]), np.array([0.5, 0.5]), np.array([0.5, 0.5, 0.5])):
    with pytest.raises(ValueError, match="noise_law"):
      glauber.GlauberProcess(L, V, 4, "linear", bad)


def test_sampler_with_unigram_noise_reproduces_p():
  """Exact law (both heads) and Monte Carlo: the sampler draws from softmax(l + log u)."""
  assert tv(go.sampler_law(UNI_CLASSIFIER, UNI_PROCESS), P) < 1e-6
  assert tv(go.sampler_law(UNI_LOG_Q - np.log(UNIGRAM), UNI_PROCESS), P) < 1e-6
  # With u ignored (the uniform sampler on the same logits) the law is wrong.
  assert tv(go.sampler_law(UNI_CLASSIFIER, PROCESS), P) > 0.02
  n = 20000
  samples = np.asarray(glauber.sample(go.table_logits_fn(UNI_CLASSIFIER, V), jax.random.key(11),
                                      UNI_PROCESS, batch_size=n))
  distance, expected = tv(empirical(samples), P), oracle.expected_tv(P, n)
  assert distance < 0.05 and distance < 1.5 * expected, (distance, expected)


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_unigram_losses():
  """Exact expected soft loss: the oracle is its minimiser; the Monte Carlo soft, hard and ce
  losses agree with the enumeration; the ce minimiser is log q - log u."""
  best = go.expected_losses(P, UNI_PROCESS, UNI_CLASSIFIER)["soft"]
  rng = np.random.default_rng(4)
  for scale in (1e-2, 0.3):
    for _ in range(3):
      perturbed = UNI_CLASSIFIER + scale * rng.normal(size=UNI_CLASSIFIER.shape).astype(np.float32)
      assert go.expected_losses(P, UNI_PROCESS, perturbed)["soft"] > best
  # The uniform process's oracle is not the minimiser under unigram noise.
  assert go.expected_losses(P, UNI_PROCESS, CLASSIFIER)["soft"] > best + 1e-3
  n = 1 << 15
  x = draw_data(6, n)
  for kind, table in (("soft", UNI_CLASSIFIER), ("hard", UNI_CLASSIFIER), ("soft", RANDOM_TABLE)):
    fn = jax.jit(functools.partial(glauber.loss, go.table_logits_fn(table, V),
                                   process=UNI_PROCESS, kind=kind))
    mean, se = mean_se(np.asarray(fn(x, jax.random.key(12)), np.float64))
    exact = go.expected_losses(P, UNI_PROCESS, table)["soft"]
    assert abs(mean - exact) < 4 * se, (kind, mean, se, exact)
  entropy = go.conditional_entropy(P, UNI_PROCESS)
  assert abs(go.expected_losses(P, UNI_PROCESS, UNI_LOG_Q - np.log(UNIGRAM))["ce"]
             - entropy) < 1e-5


# ------------------------------------------------------------------------------- the NELBO


@functools.cache
def nelbo_case(sweeps: int, noise: str):
  process = glauber.GlauberProcess(L, V, sweeps, "linear", NOISES[noise])
  return process, go.oracle_tables(P, process)[0], *go.nelbo_offsets(P, process)


def nelbo_draws(table: np.ndarray, process: glauber.GlauberProcess, reps: int, seed: int
                ) -> np.ndarray:
  """reps independent NELBO draws (one row each, so t is uniform) of every sequence:
  float64[reps, V^L]."""
  fn = go.table_logits_fn(table, V)
  x = jnp.tile(jnp.asarray(SEQS), (reps, 1))
  keys = jax.random.split(jax.random.key(seed), len(x))
  one = lambda key, row: glauber.nelbo(fn, row[None], key, process)[0]
  return np.asarray(jax.jit(jax.vmap(one))(keys, x), np.float64).reshape(reps, -1)


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("sweeps", [pytest.param(1, marks=pytest.mark.slow),
                                    pytest.param(2, marks=pytest.mark.slow), 4])
def test_nelbo_with_oracle_equals_minus_log_p(sweeps, noise):
  """With exact classifiers the NELBO's mean is -log p(x) + gap(x) (gap from the path identity,
  |gap| <= the prior term's size), for every x, within 4 standard errors.

  Measured (2048 draws per x): E_p[NELBO] - H(p) = 0.003, -0.034, -0.001 nats (se 0.005, 0.017,
  0.027) for K = 1, 2, 4 with uniform noise; 0.003, -0.008, -0.012 with unigram; the largest
  |z| over the 27 sequences is 2.4. The prior term is below 1e-7 nats (alpha(1) = 1e-4).
  """
  process, table, gap, prior = nelbo_case(sweeps, noise)
  np.testing.assert_allclose(process.prior_kl(jnp.asarray(SEQS)), prior, rtol=1e-3, atol=1e-7)
  draws = nelbo_draws(table, process, 2048, sweeps)
  mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
  minus_log_p = -np.log(P.reshape(-1))
  weights = P.reshape(-1)
  # Averaged over x ~ p, gap = KL(p_T || u^L) is between 0 and the mean prior term.
  assert -1e-12 <= weights @ gap <= weights @ prior + 1e-12
  assert np.all(np.abs(gap) < 2 * prior.max())
  assert np.all(np.abs(mean - minus_log_p - gap) < 4 * se), np.abs(mean - minus_log_p - gap) / se
  assert np.all(np.abs(mean - minus_log_p) < 4 * se + prior)
  # Averaged over x ~ p: the bound is tight to within its Monte Carlo error.
  assert abs(weights @ (mean - minus_log_p)) < 4 * np.sqrt(weights**2 @ se**2)


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_nelbo_with_inexact_classifier_is_above_minus_log_p(noise):
  process, table, _, _ = nelbo_case(2, noise)
  perturbed = table + np.random.default_rng(5).normal(0.0, 0.5, table.shape).astype(np.float32)
  draws = nelbo_draws(perturbed, process, 1024, 7)
  weights = P.reshape(-1)
  excess = weights @ (draws.mean(0) + np.log(weights))
  se = np.sqrt(weights**2 @ (draws.var(0, ddof=1) / len(draws)))
  # Measured: E_p[NELBO] - H(p) = 0.375 (uniform), 0.402 (unigram) nats, se 0.027.
  assert excess > 10 * se and excess > 0.05, (excess, se)


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_nelbo_shapes_full_rows_and_stratification():
  process, table, _, _ = nelbo_case(4, "unigram")
  x = draw_data(8, 48)
  rows = glauber.nelbo(go.table_logits_fn(table, V), x, jax.random.key(13), process)
  full = glauber.nelbo(go.table_logits_fn(table, V, full_rows=True), x, jax.random.key(13),
                       process)
  assert rows.shape == (48,) and rows.dtype == jnp.float32 and np.all(np.isfinite(rows))
  np.testing.assert_allclose(rows, full, rtol=1e-6)
  # One call per row, stratified: the 48 rows visit each of the T = 12 steps 4 times.
  seen = []

  def recording_fn(x_in, t):
    seen.append(t)
    return go.table_logits_fn(table, V)(x_in, t)

  glauber.nelbo(recording_fn, x, jax.random.key(13), process)
  assert len(seen) == 1
  np.testing.assert_array_equal(np.bincount(np.asarray(seen[0]), minlength=12), np.full(12, 4))


@pytest.mark.parametrize("noise", ["uniform", "unigram"])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_nelbo_of_zero_logits_at_demo_size_is_minus_log_u(noise):
  """Zero logits make q_t = u: R_t is then the exact reversal of the stationary chain started at
  u^L, so the NELBO's mean is exactly -sum_j log u(x_j), here at V = 512, L = 48, K = 2."""
  vocab_size, seq_len = 512, 48
  u = None if noise == "uniform" else np.random.default_rng(6).dirichlet(np.ones(vocab_size))
  process = glauber.GlauberProcess(seq_len, vocab_size, 2, "linear", u)
  n = 4096
  x = jax.random.randint(jax.random.key(14), (n, seq_len), 0, vocab_size)
  zero = lambda x_in, t: jnp.zeros((x_in.shape[0], vocab_size))
  values = np.asarray(jax.jit(functools.partial(glauber.nelbo, zero, process=process))(
      x, jax.random.key(15)), np.float64)
  target = -np.asarray(process.log_noise_dist(), np.float64)[np.asarray(x)].sum(1)
  diff_mean, diff_se = mean_se(values - target)
  assert abs(diff_mean) < 4 * diff_se, (diff_mean, diff_se)
  assert diff_se < 0.03 * target.mean()  # the test has power: within 3% of the true value
