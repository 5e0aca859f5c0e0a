"""MD4 exactness: NELBO against -log p(x) and the sampler against p, with an exact oracle."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4.diffusion import masked
from md4.diffusion.categorical import adjust_logits
from md4.diffusion.schedules import get_schedule
from tests import oracle

V, L = 3, 3
P = oracle.random_distribution(0, V, L)
LOGITS_FN = oracle.masked_oracle(P)


def nelbo_stats(x, schedule_name, num_steps=0, batch=256, repeats=200, estimator="time"):
  """Mean and standard error of the NELBO of one sequence x over many antithetic batches."""
  schedule = get_schedule(schedule_name)
  xs = jnp.tile(jnp.asarray(x)[None], (batch, 1))

  @jax.jit
  def batch_mean(rng):
    return masked.nelbo(LOGITS_FN, xs, rng, schedule, vocab_size=V, num_steps=num_steps,
                        estimator=estimator).mean()

  means = np.asarray(jax.vmap(batch_mean)(jax.random.split(jax.random.key(1), repeats)))
  return means.mean(), means.std(ddof=1) / np.sqrt(repeats)


# The most and a less likely sequence.
SEQS = [np.unravel_index(k, P.shape) for k in (np.argmax(P), np.argsort(P.reshape(-1))[5])]


@pytest.mark.parametrize("schedule_name", ["linear", "cosine", "poly2", "geometric"])
@pytest.mark.parametrize("x", SEQS)
def test_continuous_nelbo_equals_negative_log_likelihood(schedule_name, x):
  mean, se = nelbo_stats(x, schedule_name)
  target = -np.log(P[x])
  # eps-clamping leaves a bias of order L * eps * log V, far below the Monte Carlo error.
  assert abs(mean - target) < 4 * se + 1e-2, (mean, se, target)
  assert se < 0.05 * target


@pytest.mark.parametrize("x", SEQS)
def test_count_estimator_equals_negative_log_likelihood_with_lower_variance(x):
  """The count estimator (exactly k masks, weight L / k) is the any-order autoregressive bound:
  exact for the oracle, whatever the schedule, and without the time estimator's 1/t spikes."""
  target = -np.log(P[x])
  time_mean, time_se = nelbo_stats(x, "linear", batch=16)
  for schedule_name in ("linear", "cosine"):
    mean, se = nelbo_stats(x, schedule_name, batch=16, estimator="count")
    assert abs(mean - target) < 4 * se + 1e-3, (schedule_name, mean, se, target)
  assert abs(time_mean - target) < 4 * time_se + 1e-2
  assert se < 0.3 * time_se, (se, time_se)  # measured: 6-11x smaller


def test_count_estimator_masks_exactly_k_stratified_over_the_batch():
  seen = []
  logits_fn = lambda z, t: (seen.append((z, t)), jnp.zeros(z.shape + (V,)))[1]
  x = jnp.zeros((8, 16), jnp.int32)
  values = masked.nelbo(logits_fn, x, jax.random.key(4), get_schedule("linear"), vocab_size=V,
                        estimator="count")
  z, t = seen[0]
  counts = np.sum(np.asarray(z) == V, axis=1)
  np.testing.assert_allclose(np.asarray(t), counts / 16)
  # One count per stratum of width L / B = 2, i.e. every pair {1, 2}, {3, 4}, ... once.
  assert sorted((counts - 1) // 2) == list(range(8)), counts
  # Uniform logits: each masked token costs log V, times the weight L / k.
  np.testing.assert_allclose(values, 16 * np.log(V), rtol=1e-6)
  with pytest.raises(ValueError, match="continuous-time"):
    masked.nelbo(logits_fn, x, jax.random.key(4), get_schedule("linear"), vocab_size=V,
                 num_steps=4, estimator="count")


def expected_nelbo(num_steps, repeats=200, copies=8):
  """E_{x~p} NELBO(x) (mean and standard error), all V^L sequences weighted by p."""
  schedule = get_schedule("linear")
  seqs = jnp.asarray(np.tile(oracle.all_sequences(V, L), (copies, 1)))
  weights = jnp.asarray(np.tile(P.reshape(-1), copies) / copies)

  @jax.jit
  def weighted(rng):
    values = masked.nelbo(LOGITS_FN, seqs, rng, schedule, vocab_size=V, num_steps=num_steps)
    return jnp.sum(weights * values)

  means = np.asarray(jax.vmap(weighted)(jax.random.split(jax.random.key(2), repeats)))
  return means.mean(), means.std(ddof=1) / np.sqrt(repeats)


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_discrete_nelbo_is_a_looser_bound():
  # Pointwise, the discrete-time NELBO bounds the likelihood of the discrete-time model (whose
  # steps reveal tokens independently), not -log p(x); averaged over x ~ p it bounds the entropy.
  entropy = -np.sum(P * np.log(P))
  continuous, continuous_se = expected_nelbo(0)
  coarse, coarse_se = expected_nelbo(2)
  fine, fine_se = expected_nelbo(64)
  assert abs(continuous - entropy) < 4 * continuous_se + 1e-2, (continuous, entropy)
  assert coarse > continuous + 4 * np.hypot(coarse_se, continuous_se), (coarse, continuous)
  assert fine > entropy - 4 * fine_se
  assert abs(fine - entropy) < abs(coarse - entropy)


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_head_capacity_is_exact_with_and_without_fallback():
  schedule = get_schedule("linear")
  x = jnp.asarray(oracle.all_sequences(V, L))  # 27 rows
  rng = jax.random.key(3)
  full = masked.nelbo(LOGITS_FN, x, rng, schedule, vocab_size=V)
  for capacity in (x.size, 20, 1):  # enough room, tight, and the full-output fallback
    gathered = masked.nelbo(LOGITS_FN, x, rng, schedule, vocab_size=V, head_capacity=capacity)
    np.testing.assert_allclose(gathered, full, rtol=1e-5, atol=1e-5)


def draw(num_samples=20000, **kw):
  kw = {"num_steps": 100, **kw}
  fn = jax.jit(functools.partial(masked.sample, LOGITS_FN, schedule=get_schedule("linear"),
                                 batch_size=num_samples, seq_len=L, vocab_size=V, **kw))
  return np.asarray(fn(jax.random.key(7)))


@pytest.mark.parametrize("grid", ["uniform", "cosine"])
def test_sampler_reproduces_p(grid):
  samples = draw(grid=grid)
  assert samples.min() >= 0 and samples.max() < V  # no mask left
  tv = oracle.total_variation(samples, P)
  assert tv < 0.05, tv
  assert tv < 3 * oracle.expected_tv(P, len(samples)), tv


def test_sampler_conditions_on_known_tokens():
  known = jnp.array([0, 2, 0])
  known_mask = jnp.array([False, True, False])
  samples = draw(known=known, known_mask=known_mask)
  assert np.all(samples[:, 1] == 2)
  conditional = P[:, 2:3, :] / P[:, 2, :].sum()
  padded = np.zeros_like(P)
  padded[:, 2:3, :] = conditional
  tv = oracle.total_variation(samples, padded)
  assert tv < 0.05 and tv < 3 * oracle.expected_tv(padded, len(samples)), tv


def test_few_steps_are_biased_many_steps_are_not():
  # With one step every token is drawn independently from its marginal: a visible bias.
  one_step = oracle.total_variation(draw(num_steps=1), P)
  assert one_step > 0.1 > oracle.total_variation(draw(num_steps=100), P)


@pytest.mark.parametrize("num_steps", [3, 64])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_cache_gives_same_samples_with_fewer_calls(num_steps):
  # A time-dependent network: the event-driven sampler calls it at each row's own time, so it
  # is exact for time-conditioned networks too.
  def time_dependent(z, t):
    return LOGITS_FN(z, t) + 3.0 * t[:, None, None] * jnp.arange(V)

  kw = dict(batch_size=8, seq_len=L, vocab_size=V, num_steps=num_steps,
            return_network_calls=True)
  schedule = get_schedule("cosine")
  for seed in range(3):
    rng = jax.random.key(seed)
    cached, cached_calls = jax.jit(lambda r: masked.sample(time_dependent, r, schedule, **kw))(rng)
    plain, plain_calls = jax.jit(
        lambda r: masked.sample(time_dependent, r, schedule, cache=False, **kw))(rng)
    np.testing.assert_array_equal(cached, plain)
    assert int(plain_calls) == num_steps
    # One call per distinct reveal step of the busiest row: at most min(num_steps, L).
    assert 1 <= int(cached_calls) <= min(num_steps, L)


def test_reveal_steps_follow_the_schedule():
  schedule = get_schedule("cosine")
  times = masked.time_grid(8, "uniform")
  steps = np.asarray(masked.reveal_steps(jax.random.key(0), schedule, times, (200_000,)))
  alpha = np.asarray(schedule.alpha(times))
  still_masked = np.append((1 - alpha[1:-1]) / (1 - alpha[0]), 0.0)
  expected = -np.diff(np.concatenate([[1.0], still_masked]))  # P(reveal at step i)
  observed = np.bincount(steps, minlength=8) / len(steps)
  np.testing.assert_allclose(observed, expected, atol=4 * np.sqrt(0.25 / len(steps)))


def test_adjust_logits_top_p_and_temperature():
  logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  kept = np.isfinite(np.asarray(adjust_logits(logits, top_p=0.7)))
  np.testing.assert_array_equal(kept, [True, True, False, False])
  kept = np.isfinite(np.asarray(adjust_logits(logits, top_p=0.81)))
  np.testing.assert_array_equal(kept, [True, True, True, False])
  cooled = jax.nn.softmax(adjust_logits(logits, temperature=0.5))
  np.testing.assert_allclose(cooled, np.array([0.5, 0.3, 0.15, 0.05])**2 / 0.365, rtol=1e-5)


def test_sample_top_p_tiny_is_greedy_on_first_step():
  # With top_p -> 0 each revealed token is the mode of its conditional at reveal time; in one
  # step from all-mask that is the argmax of each position's marginal.
  samples = draw(num_samples=64, num_steps=1, top_p=1e-6)
  marginal_modes = [np.argmax(P.sum(axis=tuple(a for a in range(L) if a != n))) for n in range(L)]
  assert np.all(samples == np.array(marginal_modes))


def cosine_alpha64(t: np.ndarray, eps: float = 1e-4) -> np.ndarray:
  """The cosine schedule in float64, written from docs/methods.md §1 (not from schedules.py)."""
  return eps + (1 - 2 * eps) * (1 - np.cos(np.pi / 2 * (1 - np.asarray(t, np.float64))))


def test_reveal_steps_match_a_step_by_step_simulation():
  """Simulate the sampler's per-step reveal probabilities r_i = (alpha_{i+1} - alpha_i) /
  (1 - alpha_i) (last step: 1) position by position, on a non-uniform time grid."""
  num_steps, num = 8, 200_000
  times = np.sin(np.pi / 2 * np.linspace(1, 0, num_steps + 1))  # the "cosine" grid
  alpha = cosine_alpha64(times)
  reveal_prob = np.append((alpha[1:-1] - alpha[:-2]) / (1 - alpha[:-2]), 1.0)
  rng = np.random.default_rng(0)
  simulated = np.full(num, -1)
  for i, r in enumerate(reveal_prob):
    simulated[(simulated < 0) & (rng.random(num) < r)] = i
  steps = np.asarray(masked.reveal_steps(jax.random.key(0), get_schedule("cosine"),
                                         jnp.asarray(times, jnp.float32), (num,)))
  observed, expected = (np.bincount(s, minlength=num_steps) / num for s in (steps, simulated))
  assert expected.min() > 2e-4  # every step reveals a visible share (100 of the positions)
  se = np.sqrt(2 * expected * (1 - expected) / num)
  assert np.all(np.abs(observed - expected) < 4.5 * se), (observed, expected)


def exact_discrete_nelbo(x: tuple, num_steps: int) -> float:
  """E[discrete-time NELBO(x)] for the linear schedule by enumeration (float64): every step k
  in 1..T (uniform) and every mask pattern, with the exact conditionals of p."""
  eps = 1e-4
  alpha = lambda t: eps + (1 - 2 * eps) * (1 - t)
  seqs = oracle.all_sequences(V, L)
  probs = P.reshape(-1)
  total = 0.0
  for k in range(1, num_steps + 1):
    t, s = k / num_steps, (k - 1) / num_steps
    reveal = (alpha(s) - alpha(t)) / (1 - alpha(t))
    for mask in itertools.product([False, True], repeat=L):
      mask = np.array(mask)
      q = np.prod(np.where(mask, 1 - alpha(t), alpha(t)))
      consistent = np.all(mask | (seqs == np.array(x)), axis=1)
      cost = 0.0
      for n in np.nonzero(mask)[0]:
        conditional = probs[consistent & (seqs[:, n] == x[n])].sum() / probs[consistent].sum()
        cost -= np.log(conditional)
      total += q * num_steps * reveal * cost / num_steps
  return total + L * (alpha(1.0) + 1 - alpha(0.0)) * np.log(V)


@pytest.mark.parametrize("num_steps, x", [(2, SEQS[0]), (5, SEQS[1])])
def test_discrete_nelbo_equals_its_enumerated_value(num_steps, x):
  exact = exact_discrete_nelbo(x, num_steps)
  mean, se = nelbo_stats(x, "linear", num_steps=num_steps, repeats=100)
  assert abs(mean - exact) < 4 * se, (x, mean, se, exact)
  assert se < 0.02 * exact
  # Averaged over x ~ p, coarser grids are looser bounds on the entropy.
  entropy = -np.sum(P * np.log(P))
  averages = [sum(P[tuple(seq)] * exact_discrete_nelbo(tuple(seq), steps)
                  for seq in oracle.all_sequences(V, L)) for steps in (2, 5, 50)]
  assert averages[0] > averages[1] > averages[2] > entropy, (averages, entropy)


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_every_network_call_gets_the_time_of_its_step(cache):
  """A recording network: each call's time must be the grid time t_i of the step at which the
  positions it reveals are revealed (step i = the uncached path's i-th call)."""
  num_steps, batch = 6, 8
  grid = np.linspace(1.0, 0.0, num_steps + 1)
  schedule = get_schedule("cosine")

  def run(cache):
    calls = []
    def recording(z, t):
      jax.debug.callback(lambda z, t: calls.append((np.asarray(z), np.asarray(t))), z, t,
                         ordered=True)
      return LOGITS_FN(z, t)
    final = masked.sample(recording, jax.random.key(5), schedule, batch_size=batch,
                          seq_len=L, vocab_size=V, num_steps=num_steps, cache=cache)
    states = [z for z, _ in calls] + [np.asarray(final)]
    return calls, states

  calls, states = run(False)
  assert len(calls) == num_steps
  reveal_step = np.full((batch, L), -1)
  for i, (_, t) in enumerate(calls):
    np.testing.assert_allclose(t, grid[i], atol=1e-7)
    reveal_step[(states[i] == V) & (states[i + 1] != V)] = i
  assert np.all(reveal_step >= 0)
  if cache:
    calls, states = run(True)
    assert len(calls) < num_steps * L
    for c, (_, t) in enumerate(calls):
      revealed = (states[c] == V) & (states[c + 1] != V)
      for b, n in zip(*np.nonzero(revealed), strict=True):
        assert abs(t[b] - grid[reveal_step[b, n]]) < 1e-7, (c, b, n, t[b])
    assert np.all(states[-1] != V)


def test_left_to_right_nll_is_the_chain_rule_and_a_normalised_law():
  seqs = oracle.all_sequences(V, L)
  nll = masked.left_to_right_nll(LOGITS_FN, jnp.asarray(seqs), vocab_size=V)
  np.testing.assert_allclose(nll, -np.log(P.reshape(-1)), rtol=1e-5)  # the oracle: q = p
  # Any network's left-to-right law sums to one over all V^L sequences, and differs from p.
  table = jax.random.normal(jax.random.key(3), ((V + 1) ** L, L, V))

  def noisy(z, t, head_index=None):
    logits = table[oracle.state_index(z, V + 1)]  # depends on the masked input, as a network
    return jnp.take_along_axis(logits, head_index[..., None], axis=1)

  q = np.exp(-np.asarray(masked.left_to_right_nll(noisy, jnp.asarray(seqs), vocab_size=V)))
  np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-5)
  assert 0.5 * np.abs(q - P.reshape(-1)).sum() > 0.1
