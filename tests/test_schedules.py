"""Schedules: closed forms against float64 references, finite everywhere on [0, 1], and the
NELBOs finite when times land exactly on the endpoints."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4.diffusion import genmd4, masked
from md4.diffusion.schedules import get_schedule

EPS = 1e-4
NAMES = ["linear", "cosine", "poly2", "poly0.5", "poly0.25", "geometric"]


def reference(name: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(alpha, 1 - alpha, alpha') in float64, from the formulas of docs/methods.md §1."""
  t = t.astype(np.float64)
  if name == "geometric":
    log_ratio = math.log(20.0 / 1e-4)
    sigma = 1e-4 * np.exp(log_ratio * t)
    return np.exp(-sigma), -np.expm1(-sigma), -np.exp(-sigma) * sigma * log_ratio
  if name == "linear":
    a, one_minus_a, da = 1 - t, t, -np.ones_like(t)
  elif name == "cosine":
    a = 1 - np.cos(np.pi / 2 * (1 - t))
    one_minus_a, da = np.cos(np.pi / 2 * (1 - t)), -np.pi / 2 * np.sin(np.pi / 2 * (1 - t))
  else:
    k = float(name[4:])
    with np.errstate(divide="ignore"):
      a, one_minus_a, da = -np.expm1(k * np.log(t)), t**k, -k * t ** (k - 1)
  scale = 1 - 2 * EPS
  return EPS + scale * a, EPS + scale * one_minus_a, scale * da


@pytest.mark.parametrize("name", NAMES)
def test_closed_forms_match_float64_near_both_ends(name):
  schedule = get_schedule(name)
  t = np.concatenate([np.geomspace(1e-7, 1e-2, 50), 1 - np.geomspace(1e-7, 1e-2, 50),
                      np.linspace(0.01, 0.99, 50)]).astype(np.float32)
  alpha, one_minus_alpha, dalpha = reference(name, t)
  # Against the float64 value at the same float32 t. Geometric near t = 1: alpha = e^-sigma
  # with sigma = 20 multiplies sigma's float32 rounding by 20, whatever the formula.
  rtol = 3e-5 if name == "geometric" else 2e-6
  np.testing.assert_allclose(schedule.alpha(jnp.asarray(t)), alpha, rtol=rtol, err_msg=name)
  np.testing.assert_allclose(schedule.one_minus_alpha(jnp.asarray(t)), one_minus_alpha,
                             rtol=2e-6, err_msg=name)
  np.testing.assert_allclose(schedule.dalpha(jnp.asarray(t)), dalpha, rtol=5 * rtol,
                             err_msg=name)
  np.testing.assert_allclose(schedule.weight(jnp.asarray(t)), dalpha / one_minus_alpha,
                             rtol=5 * rtol, err_msg=name)


def float32_grid() -> np.ndarray:
  """Every 2^10-th float32 in [0, 1] by bit pattern (all exponents, subnormals included), and
  every multiple of 2^-23 (what antithetic float32 times can be) within 2^-11 of 0 and of 1."""
  bits = np.arange(0, np.float32(1).view(np.int32) + 1, 1024, dtype=np.int32)
  ends = np.arange(2**12 + 1, dtype=np.float32) / 2**23
  return np.concatenate([bits.view(np.float32), ends, 1 - ends, [1.0]]).astype(np.float32)


@pytest.mark.parametrize("name", NAMES)
def test_finite_on_the_whole_float32_grid(name):
  schedule = get_schedule(name)

  @jax.jit
  def checks(t):
    alpha, one_minus_alpha = schedule.alpha(t), schedule.one_minus_alpha(t)
    finite = [jnp.all(jnp.isfinite(v)) for v in (alpha, one_minus_alpha, schedule.dalpha(t),
                                                  schedule.weight(t))]
    in_range = jnp.all((alpha > 0) & (alpha <= 1) & (one_minus_alpha > 0)
                       & (one_minus_alpha <= 1) & (schedule.weight(t) <= 0))
    return jnp.stack(finite + [in_range]), jnp.max(jnp.abs(alpha + one_minus_alpha - 1))

  ok, sum_error = checks(jnp.asarray(float32_grid()))
  assert bool(jnp.all(ok)), (name, ok)
  assert float(sum_error) < 5e-7, name  # a few float32 ulps of 1


def endpoint_times(rng, batch_size):
  """Times with t = 0 and t = 1 exactly (and values next to them)."""
  del rng
  base = jnp.array([0.0, 1.0, 2.0**-23, 1.0 - 2.0**-24, 0.5, 0.25, 0.75, 1e-30], jnp.float32)
  return jnp.resize(base, (batch_size,))


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_nelbo_finite_at_endpoint_times(monkeypatch):
  monkeypatch.setattr(masked, "antithetic_times", endpoint_times)
  vocab_size = 5
  x = jax.random.randint(jax.random.key(0), (16, 12), 0, vocab_size)
  logits_fn = lambda z, t: jnp.sin(jnp.arange(vocab_size) + z[..., None] + t[:, None, None])

  @jax.jit
  def nelbos(rng):
    return jnp.stack([masked.nelbo(logits_fn, x, rng, get_schedule(name), vocab_size=vocab_size,
                                   num_steps=num_steps)
                      for name in NAMES for num_steps in (0, 1000)])

  values = np.asarray(jax.vmap(nelbos)(jax.random.split(jax.random.key(1), 4)))
  assert np.all(np.isfinite(values)) and np.all(values >= 0), values


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_genmd4_finite_at_endpoint_times(monkeypatch):
  monkeypatch.setattr(genmd4, "antithetic_times", endpoint_times)
  vocab_size = 5
  x = jax.random.randint(jax.random.key(0), (16, 12), 0, vocab_size)
  logits_fn = lambda z, t: jnp.sin(jnp.arange(vocab_size) + z[..., None] + t[:, None, None])
  w_raw = jnp.array([-3.0, -1.0, 0.0, 1.0, 3.0])

  def losses_and_grad(rng):
    def mean_surrogate(w_raw):
      surrogate, nelbo = genmd4.loss(logits_fn, x, rng, jax.nn.softplus(w_raw),
                                     vocab_size=vocab_size)
      return surrogate.mean(), (surrogate, nelbo)

    grad, values = jax.grad(mean_surrogate, has_aux=True)(w_raw)
    return values + (grad,)

  for values in jax.jit(jax.vmap(losses_and_grad))(jax.random.split(jax.random.key(1), 4)):
    assert bool(jnp.all(jnp.isfinite(values))), values
