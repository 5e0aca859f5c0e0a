"""The sampler toolbox against exact oracles: ReMDM remasking, confidence order, blocks, guidance,
top-k, and known tokens for every sampler."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4.diffusion import blocks, confidence, genmd4, guidance, masked, remasking
from md4.diffusion.categorical import adjust_logits
from md4.diffusion.schedules import get_schedule
from tests import oracle

V, L = 3, 3
N = 20000
P = oracle.random_distribution(0, V, L)
LOGITS_FN = oracle.masked_oracle(P)
TABLE = oracle.masked_conditional_table(P)
EPS = 1e-4  # the clamp of the linear schedule


def assert_close_in_law(samples: np.ndarray, law: np.ndarray) -> float:
  """TV of the samples' empirical law against `law` ([V] * L): below 0.05 and 3x its noise."""
  assert samples.min() >= 0 and samples.max() < law.shape[0], "a mask is left"
  tv = oracle.total_variation(samples, law)
  assert tv < 0.05 and tv < 3 * oracle.expected_tv(law, len(samples)), tv
  return tv


# --- ReMDM: the exact law of the chain, by enumeration (independent of md4.diffusion) ---------


def linear_alpha(t: float) -> float:
  return EPS + (1 - 2 * EPS) * (1 - t)


def loop_grid(num_steps: int, alpha_on: float, t_on: float, t_off: float) -> list[float]:
  held = 1 - (alpha_on - EPS) / (1 - 2 * EPS)  # linear_alpha(held) = alpha_on
  return [held + (1 - held) * (x - t_on) / (1 - t_on) if x >= t_on
          else held if x > t_off else held * x / t_off for x in np.linspace(1, 0, num_steps + 1)]


P4 = oracle.random_distribution(1, 2, 4)
LOGITS_FN4 = oracle.masked_oracle(P4)
MU = {id(p): np.exp(t) / np.exp(t).sum(-1, keepdims=True)  # [(V+1)^L, L, V] by state index
      for p, t in ((P, TABLE), (P4, oracle.masked_conditional_table(P4)))}


def remdm_law(num_steps: int, kind: str, eta: float, alpha_on: float = 0.9, t_on: float = 0.55,
              t_off: float = 0.05, p: np.ndarray = P) -> np.ndarray:
  """The exact law of the ReMDM chain with the oracle's conditionals of p, linear schedule.

  The state is the sequence and, for `conf`, the probability each token had when revealed.
  """
  V, L = p.shape[0], p.ndim  # noqa: N806
  mask = V
  powers = (V + 1) ** np.arange(L - 1, -1, -1)
  u = np.linspace(1.0, 0.0, num_steps + 1)
  times = loop_grid(num_steps, alpha_on, t_on, t_off) if kind == "loop" else list(u)
  states = {((mask,) * L, (0.0,) * L): 1.0}
  for i in range(num_steps):
    a_t, a_s = linear_alpha(times[i]), linear_alpha(times[i + 1])
    sigma_max = min(1.0, (1 - a_s) / a_t)
    last = i == num_steps - 1
    new_states: dict = {}
    for (z, psi), prob in states.items():
      mu = MU[id(p)][int(np.dot(z, powers))]
      unmasked = [n for n in range(L) if z[n] != mask]
      if kind == "cap":
        sigma = [min(eta, sigma_max)] * L
      elif kind == "rescale":
        sigma = [eta * sigma_max] * L
      elif kind == "loop":
        sigma = [min(eta, sigma_max) if t_off < u[i] <= t_on else 0.0] * L
      else:
        w = np.array([np.exp(-psi[n]) if n in unmasked else 0.0 for n in range(L)])
        sigma = list(w / max(w.sum(), 1e-30) * sigma_max)
      options = []
      for n in range(L):
        s = 0.0 if last else sigma[n]
        if z[n] == mask:
          reveal = 1.0 if last else (a_s - (1 - s) * a_t) / (1 - a_t)
          opts = [(v, mu[n, v] if kind == "conf" else 0.0, reveal * mu[n, v]) for v in range(V)]
          options.append(opts + [(mask, 0.0, 1 - reveal)])
        else:
          options.append([(z[n], psi[n], 1 - s), (mask, 0.0, s)])
      for choice in itertools.product(*options):
        weight = prob * math.prod(c[2] for c in choice)
        if weight > 0:
          key = (tuple(c[0] for c in choice), tuple(c[1] for c in choice))
          new_states[key] = new_states.get(key, 0.0) + weight
    states = new_states
  law = np.zeros((V,) * L)
  for (z, _), prob in states.items():
    law[z] += prob
  return law


REMDM_SETTINGS = {"cap": dict(eta=0.9), "rescale": dict(eta=0.9), "conf": dict(eta=0.0),
                  "loop": dict(eta=0.9, alpha_on=0.5)}


def remdm_draw(kind: str, num_steps: int, logits_fn=LOGITS_FN, seq_len: int = L,
               vocab_size: int = V, **kw) -> np.ndarray:
  fn = functools.partial(remasking.sample, logits_fn, schedule=get_schedule("linear"),
                         batch_size=N, seq_len=seq_len, vocab_size=vocab_size,
                         num_steps=num_steps, sigma_schedule=kind, **(kw or REMDM_SETTINGS[kind]))
  return np.asarray(jax.jit(fn)(jax.random.key(11)))


# Fewer and more steps than L = 4; conf's enumeration (sequence and confidences) is the slow one.
@pytest.mark.parametrize("kind,num_steps", [
    *((kind, n) for kind in remasking.SIGMA_SCHEDULES for n in (3, 6) if (kind, n) != ("conf", 6)),
    pytest.param("conf", 6, marks=pytest.mark.slow)])
def test_remdm_follows_its_exact_chain(kind, num_steps):
  law = remdm_law(num_steps, kind, **REMDM_SETTINGS[kind], p=P4)
  samples = remdm_draw(kind, num_steps, logits_fn=LOGITS_FN4, seq_len=4, vocab_size=2)
  assert_close_in_law(samples, law)
  # Remasking matters at these steps: the ancestral chain's law is far from this one.
  assert 0.5 * np.abs(remdm_law(num_steps, "cap", eta=0.0, p=P4) - law).sum() > 0.025


# The paper's loop setting; cap and rescale as above.
MANY_STEPS = {"cap": dict(eta=0.5), "rescale": dict(eta=0.7), "loop": dict(eta=0.02, alpha_on=0.9)}


@pytest.mark.parametrize("kind", list(MANY_STEPS))
def test_remdm_keeps_the_marginals_so_many_steps_reproduce_p(kind):
  """With sigma independent of the state the mask pattern keeps q(z_s | x); what is left at 128
  steps is the factorised network's error on simultaneous moves (exact chain: 0.012-0.014 TV for
  cap 0.5 / rescale 0.7, 0.004 for the paper's loop, 0.002 for ancestral)."""
  law = remdm_law(128, kind, **MANY_STEPS[kind])
  assert 0.5 * np.abs(law - P).sum() < 0.02
  samples = remdm_draw(kind, 128, **MANY_STEPS[kind])
  assert_close_in_law(samples, law)
  assert_close_in_law(samples, P)


def test_remdm_chain_oracle_is_ancestral_at_sigma_zero_and_remasks_otherwise():
  # The enumeration itself: sigma = 0 is the ancestral chain; many ancestral steps give p.
  ancestral = remdm_law(64, "cap", eta=0.0)
  assert 0.5 * np.abs(ancestral - P).sum() < 0.005


@pytest.mark.slow
def test_remdm_conf_is_not_marginal_keeping():
  """conf remasks without matching extra unmasking, so masks pile up and are revealed together
  late: farther from p than ancestral at the same steps, even with exact conditionals
  (measured TV: 8 steps 0.080 vs 0.035, 16 steps 0.057 vs 0.017, 32 steps 0.040 vs 0.009)."""
  for num_steps in (8, 16):
    conf_tv = 0.5 * np.abs(remdm_law(num_steps, "conf", eta=0.0) - P).sum()
    ancestral_tv = 0.5 * np.abs(remdm_law(num_steps, "cap", eta=0.0) - P).sum()
    assert conf_tv > 2 * ancestral_tv, (num_steps, conf_tv, ancestral_tv)


# --- block decoding -------------------------------------------------------------------------


def ancestral(num_steps: int, **kw):
  return functools.partial(masked.sample, schedule=get_schedule("linear"), num_steps=num_steps,
                           return_network_calls=True, **kw)


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_block_decoding_is_exact_for_any_block_size(block_size):
  fn = functools.partial(blocks.sample, ancestral(64, vocab_size=2), LOGITS_FN4, batch_size=N,
                         seq_len=4, vocab_size=2, block_size=block_size,
                         return_network_calls=True)
  samples, calls = jax.jit(fn)(jax.random.key(3))
  assert_close_in_law(np.asarray(samples), P4)
  assert int(calls) <= 4 // block_size * min(64, block_size)


def test_block_decoding_wraps_remasking():
  inner = functools.partial(remasking.sample, schedule=get_schedule("linear"), vocab_size=2,
                            num_steps=64, sigma_schedule="cap", eta=0.3,
                            return_network_calls=True)
  fn = functools.partial(blocks.sample, inner, LOGITS_FN4, batch_size=N, seq_len=4,
                         vocab_size=2, block_size=2, return_network_calls=True)
  samples, calls = jax.jit(fn)(jax.random.key(4))
  assert_close_in_law(np.asarray(samples), P4)
  assert int(calls) == 2 * 64


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_sliding_window_continues_with_the_window_conditionals():
  # Window L = 4, blocks of 2, 8 tokens: x[0:4] ~ p, then each new pair ~ p(x[2:4] | x[0:2] =
  # the two tokens before it).
  length = 8
  fn = functools.partial(blocks.sample, ancestral(32, vocab_size=2), LOGITS_FN4, batch_size=N,
                         seq_len=4, vocab_size=2, block_size=2, length=length)
  samples = np.asarray(jax.jit(fn)(jax.random.key(5)))
  law = np.zeros((2,) * length)
  for x in itertools.product(range(2), repeat=length):
    prob = P4[x[:4]]
    for begin in (4, 6):
      context = x[begin - 2:begin]
      prob *= P4[context + x[begin:begin + 2]] / P4[context].sum()
    law[x] = prob
  assert_close_in_law(samples, law)


def test_block_layout_errors():
  with pytest.raises(ValueError, match="multiple of the block size 3"):
    blocks.check_blocks(4, 4, 3)
  with pytest.raises(ValueError, match="block size 5"):
    blocks.check_blocks(4, 8, 5)


# --- guidance -------------------------------------------------------------------------------

P2 = oracle.random_distribution(2, 3, 2)
LOGITS_FN2 = oracle.masked_oracle(P2)
PROMPT = jnp.array([True, False])


@pytest.mark.parametrize("scale", [0.0, 1.5])
def test_prompt_guidance_tilts_by_the_unconditional(scale):
  # Position 0 is the prompt; the unconditional branch sees it masked. The second token then
  # follows p(x1 | x0)^(1 + g) / p(x1)^g exactly (one masked position).
  x0 = 1
  guided = guidance.guided(LOGITS_FN2, guidance.without(LOGITS_FN2, PROMPT, 3), scale)
  kw = dict(schedule=get_schedule("linear"), batch_size=N, seq_len=2, vocab_size=3,
            num_steps=4, known=jnp.array([x0, 0]), known_mask=PROMPT)
  samples = np.asarray(jax.jit(functools.partial(masked.sample, guided, **kw))(jax.random.key(6)))
  tilted = P2[x0] ** (1 + scale) / P2.sum(0) ** scale
  law = np.zeros_like(P2)
  law[x0] = tilted / tilted.sum()
  assert_close_in_law(samples, law)
  if scale == 0.0:  # the conditional sampler itself, sample for sample
    plain = jax.jit(functools.partial(masked.sample, LOGITS_FN2, **kw))(jax.random.key(6))
    np.testing.assert_array_equal(samples, plain)


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_guidance_at_zero_equals_conditional_for_every_sampler():
  uncond = guidance.without(LOGITS_FN, jnp.array([True, False, False]), V)
  kw = dict(schedule=get_schedule("linear"), batch_size=64, seq_len=L, vocab_size=V,
            num_steps=8, known=jnp.array([2, 0, 0]), known_mask=jnp.array([True, False, False]))
  for fn in (masked.sample, remasking.sample, confidence.sample):
    a = fn(guidance.guided(LOGITS_FN, uncond, 0.0), jax.random.key(1), **kw)
    b = fn(LOGITS_FN, jax.random.key(1), **kw)
    np.testing.assert_array_equal(a, b)


# --- known tokens, every sampler ------------------------------------------------------------


def random_network(vocab_size: int, seq_len: int):
  """A state-dependent network: logits a random linear map of the one-hot input and t."""
  weights = jax.random.normal(jax.random.key(9), (seq_len * (vocab_size + 1), seq_len * vocab_size))
  def logits_fn(z, t):
    x = jax.nn.one_hot(z, vocab_size + 1).reshape(z.shape[0], -1)
    return (x @ weights).reshape(z.shape[0], seq_len, vocab_size) + t[:, None, None]
  return logits_fn


def all_samplers(vocab_size: int, num_steps: int):
  linear = get_schedule("linear")
  base = dict(vocab_size=vocab_size, num_steps=num_steps, return_network_calls=True)
  samplers = {"ancestral": functools.partial(masked.sample, schedule=linear, **base),
              "genmd4": functools.partial(genmd4.sample, w=jnp.linspace(0.5, 2, vocab_size),
                                          **base)}
  for kind in remasking.SIGMA_SCHEDULES:
    samplers[f"remdm_{kind}"] = functools.partial(
        remasking.sample, schedule=linear, sigma_schedule=kind, eta=0.3, alpha_on=0.5, **base)
  for kind in confidence.CONFIDENCES:
    samplers[f"confidence_{kind}"] = functools.partial(
        confidence.sample, schedule=linear, confidence=kind, gumbel_temperature=0.5, **base)
  return samplers


KNOWN_SAMPLERS = [*all_samplers(5, 6), "blocks", "guided"]


@pytest.mark.parametrize("name", KNOWN_SAMPLERS)
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_known_tokens_never_change(name):
  vocab_size, seq_len, batch = 5, 6, 16
  logits_fn = random_network(vocab_size, seq_len)
  rng_known, rng_mask = jax.random.split(jax.random.key(2))
  known = jax.random.randint(rng_known, (batch, seq_len), 0, vocab_size)
  known_mask = jax.random.uniform(rng_mask, (batch, seq_len)) < 0.4
  samplers = all_samplers(vocab_size, 6)
  samplers["blocks"] = functools.partial(blocks.sample, samplers["remdm_cap"], block_size=3,
                                         vocab_size=vocab_size, return_network_calls=True)
  samplers["guided"] = samplers["remdm_conf"]
  if name == "guided":
    logits_fn = guidance.guided(logits_fn, guidance.without(logits_fn, known_mask, vocab_size), 2.0)
  samples, calls = jax.jit(lambda r: samplers[name](
      logits_fn, r, batch_size=batch, seq_len=seq_len, known=known, known_mask=known_mask))(
          jax.random.key(0))
  samples = np.asarray(samples)
  np.testing.assert_array_equal(samples[known_mask], np.asarray(known)[known_mask])
  assert samples.min() >= 0 and samples.max() < vocab_size
  assert 1 <= int(calls) <= 12, int(calls)


# --- confidence-ordered decoding ------------------------------------------------------------

ORDER_L = 4


def order_recorder(sharpness: jnp.ndarray):
  """A network whose every prediction is the number of tokens revealed so far (V = L), so that
  sample[n] is the step at which position n was revealed. Its confidence at position n grows
  with sharpness[n]."""
  def logits_fn(z, t):
    del t
    revealed = jnp.sum(z != ORDER_L, axis=1)
    onehot = jax.nn.one_hot(revealed, ORDER_L)[:, None, :]
    return onehot * sharpness[None, :, None]
  return logits_fn


def order_draw(gumbel_temperature, confidence_kind="max_prob", num=N, seed=0):
  logits_fn = order_recorder(jnp.array([1.0, 4.0, 2.0, 3.0]))
  fn = functools.partial(confidence.sample, logits_fn, schedule=get_schedule("linear"),
                         batch_size=num, seq_len=ORDER_L, vocab_size=ORDER_L, num_steps=ORDER_L,
                         top_k=1, confidence=confidence_kind, tokens_per_step=1,
                         gumbel_temperature=gumbel_temperature, return_network_calls=True)
  samples, calls = jax.jit(fn)(jax.random.key(seed))
  assert int(calls) == ORDER_L
  return np.asarray(samples)


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_infinite_gumbel_temperature_reveals_in_uniformly_random_order():
  orders = order_draw(math.inf)
  perms = list(itertools.permutations(range(ORDER_L)))
  assert all(tuple(row) in perms for row in orders[:100])
  index = {perm: k for k, perm in enumerate(perms)}
  counts = np.bincount([index[tuple(row)] for row in orders], minlength=len(perms))
  uniform = np.full(len(perms), 1 / len(perms))
  tv = 0.5 * np.abs(counts / len(orders) - uniform).sum()
  expected = 0.5 * np.sum(np.sqrt(2 * uniform * (1 - uniform) / (np.pi * len(orders))))
  assert tv < 0.05 and tv < 3 * expected, tv
  # A finite temperature prefers the confident positions: not uniform.
  finite = order_draw(0.05)
  assert np.mean(finite[:, 1] == 0) > 0.5


@pytest.mark.parametrize("kind", confidence.CONFIDENCES)
def test_zero_gumbel_temperature_is_deterministic_most_confident_first(kind):
  a, b = order_draw(0.0, kind, num=16, seed=0), order_draw(0.0, kind, num=16, seed=1)
  np.testing.assert_array_equal(a, b)
  # sharpness [1, 4, 2, 3]: position 1 first, then 3, 2, 0.
  np.testing.assert_array_equal(a, np.tile([3, 0, 2, 1], (16, 1)))


def test_reveal_counts_follow_the_schedule_or_fixed_k():
  times = masked.time_grid(3)
  counts = confidence.reveal_counts(get_schedule("linear"), times, jnp.array([6, 4]), 0)
  np.testing.assert_array_equal(counts, [[2, 1], [4, 3], [6, 4]])
  fixed = confidence.reveal_counts(get_schedule("linear"), times, jnp.array([6, 4]), 3)
  np.testing.assert_array_equal(fixed, [[3, 3], [6, 4], [6, 4]])


def test_confidence_calls_skip_steps_without_reveals():
  fn = functools.partial(confidence.sample, LOGITS_FN, schedule=get_schedule("linear"),
                         batch_size=8, seq_len=L, vocab_size=V, num_steps=64,
                         return_network_calls=True)
  samples, calls = jax.jit(fn)(jax.random.key(0))
  assert int(calls) == L and np.asarray(samples).max() < V


# --- top-k ----------------------------------------------------------------------------------


def test_adjust_logits_top_k_then_top_p():
  logits = jnp.log(jnp.array([0.1, 0.5, 0.15, 0.25]))
  kept = np.isfinite(np.asarray(adjust_logits(logits, top_k=2)))
  np.testing.assert_array_equal(kept, [False, True, False, True])
  # Top-p applies to the renormalised top-k: 0.5 / 0.75 = 0.67 < 0.7, so both stay.
  kept = np.isfinite(np.asarray(adjust_logits(logits, top_k=2, top_p=0.7)))
  np.testing.assert_array_equal(kept, [False, True, False, True])
  kept = np.isfinite(np.asarray(adjust_logits(logits, top_k=2, top_p=0.6)))
  np.testing.assert_array_equal(kept, [False, True, False, False])
  np.testing.assert_array_equal(adjust_logits(logits, top_k=4), adjust_logits(logits))


# --- config.sampling selects the sampler ----------------------------------------------------


def tiny_config(model_type: str = "md4", **sampling):
  from md4 import config_lib
  config = config_lib.base()
  config.model_type, config.seq_len, config.vocab_size = model_type, 8, 5
  config.model.update(width=16, depth=1, num_heads=2)
  config.sampling.update(num_steps=6, **sampling)
  return config


@pytest.mark.parametrize("model_type,sampling", [
    ("md4", dict(method="remdm", remask_schedule="loop")),
    ("md4", dict(method="confidence", confidence="margin", block_size=4, guidance=1.0)),
    ("genmd4", dict(method="confidence", gumbel_temperature=math.inf, top_k=2)),
    ("genmd4", dict(method="ancestral", block_size=2)),
])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_config_selects_the_sampler_and_counts_network_passes(model_type, sampling):
  from md4 import config_lib
  from md4.methods import METHODS
  config = tiny_config(model_type, **sampling)
  config_lib.validate(config)
  method = METHODS[model_type](config, 5)
  params = method.init(jax.random.key(0))
  known = jnp.array([1, 2, 0, 0, 0, 0, 0, 0])
  known_mask = jnp.arange(8) < 2
  samples, calls = jax.jit(method.sample_with_calls, static_argnums=2)(
      params, jax.random.key(1), 4, known, known_mask)
  samples = np.asarray(samples)
  assert samples.shape == (4, 8) and samples.max() < 5
  np.testing.assert_array_equal(samples[:, :2], [[1, 2]] * 4)
  blocks_count = 8 // (sampling.get("block_size") or 8)
  passes = 2 if sampling.get("guidance") else 1
  if sampling["method"] == "confidence":  # steps that reveal something only
    assert passes <= int(calls) <= passes * blocks_count * 6
  else:
    assert int(calls) == passes * blocks_count * 6


@pytest.mark.parametrize("model_type,sampling,message", [
    ("genmd4", dict(method="remdm"), "not available for model_type 'genmd4'"),
    ("ggm", dict(method="confidence"), "not available for model_type 'ggm'"),
    ("md4", dict(block_size=3), "does not divide seq_len 8"),
    ("md4", dict(method="confidence", tokens_per_step=9), "exceeds the 8 positions"),
    ("md4", dict(method="confidence", tokens_per_step=5, block_size=4), "exceeds the 4"),
    ("ar", dict(guidance=1.0), "no conditional branch"),
    ("md4", dict(method="remdm", remask_schedule="rescale", eta=2.0), "rescale: in"),
    ("md4", dict(method="remdm", remask_schedule="nope"), "remask_schedule must be one of"),
])
def test_invalid_sampler_settings_are_one_line_errors(model_type, sampling, message):
  from md4 import config_lib
  config = tiny_config(model_type, **sampling)
  if model_type == "ar":
    config.model.time_conditioning = False
  with pytest.raises(config_lib.ConfigError, match=message) as error:
    config_lib.validate(config)
  assert "\n" not in str(error.value)


def test_guidance_without_a_prompt_is_an_error():
  from md4.evaluation import inference
  with pytest.raises(ValueError, match="give --prompt or --infill"):
    inference.conditioning(tiny_config(guidance=1.0), prompt=None, infill_text=None,
                           infill_region=None)
