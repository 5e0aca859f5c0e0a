"""Muon: the Newton-Schulz iteration keeps singular vectors and equalises singular values, and
the momentum and shape scaling are as documented."""

import jax.numpy as jnp
import numpy as np
import pytest

from md4.training import muon


def with_spectrum(shape, singular_values, seed=0):
  rng = np.random.default_rng(seed)
  k = min(shape)
  u, _ = np.linalg.qr(rng.normal(size=(shape[0], k)))
  v, _ = np.linalg.qr(rng.normal(size=(shape[1], k)))
  return u, v, (u * singular_values) @ v.T


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48)])
def test_orthogonalize_keeps_vectors_and_brings_singular_values_near_one(shape):
  # Condition number 50: the output is U diag(s') V^T with every s' within [0.65, 1.2].
  u, v, g = with_spectrum(shape, 5 * np.geomspace(0.02, 1, min(shape)))
  o = np.asarray(muon.orthogonalize(jnp.asarray(g, jnp.float32)))
  r = u.T @ o @ v
  s = np.diag(r)
  np.testing.assert_allclose(r - np.diag(s), 0, atol=1e-5)
  assert 0.65 < s.min() and s.max() < 1.2, s


def test_fewer_steps_leave_small_singular_values_lower():
  # Three steps multiply a singular value at 1/50 of the largest only up to ~0.38 (slope
  # a = 3.4445 at zero, so ~3.4445^3 / 50 before saturating); the vectors are still kept.
  u, v, g = with_spectrum((32, 64), 5 * np.geomspace(0.02, 1, 32))
  r = u.T @ np.asarray(muon.orthogonalize(jnp.asarray(g, jnp.float32), steps=3)) @ v
  s = np.diag(r)
  np.testing.assert_allclose(r - np.diag(s), 0, atol=1e-5)
  assert 0.3 < s.min() < 0.5 and s.max() < 1.25, s


@pytest.mark.parametrize("shape", [(32, 64), (64, 32)])
def test_bfloat16_operands_stay_near_the_float32_iteration(shape):
  # Rounding the products' operands moves the result by bfloat16 error only: the same singular
  # vectors (off-diagonal < 0.02), singular values still in [0.65, 1.2].
  u, v, g = with_spectrum(shape, 5 * np.geomspace(0.02, 1, min(shape)))
  exact = np.asarray(muon.orthogonalize(jnp.asarray(g, jnp.float32)))
  rounded = muon.orthogonalize(jnp.asarray(g, jnp.float32), operand_dtype=jnp.bfloat16)
  assert rounded.dtype == jnp.float32
  rounded = np.asarray(rounded)
  r = u.T @ rounded @ v
  s = np.diag(r)
  assert np.abs(r - np.diag(s)).max() < 0.02
  assert 0.65 < s.min() and s.max() < 1.2, s
  assert 1e-4 < np.abs(rounded - exact).max() < 0.05  # rounded, and only by a little


@pytest.mark.parametrize("steps", [5, 3])
def test_momentum_and_shape_scale(steps):
  beta = 0.9
  tx = muon.scale_by_muon(beta, steps)
  grads = [np.random.default_rng(i).normal(size=(16, 64)).astype(np.float32) for i in (1, 2)]
  state = tx.init({"w": jnp.zeros((16, 64))})
  momentum = np.zeros((16, 64))
  for g in grads:
    update, state = tx.update({"w": jnp.asarray(g)}, state)
    momentum = beta * momentum + (1 - beta) * g
    nesterov = beta * momentum + (1 - beta) * g
    orthogonal = np.asarray(muon.orthogonalize(jnp.asarray(nesterov, jnp.float32), steps))
    expected = 2.0 * orthogonal  # sqrt(fan_out / fan_in) = sqrt(64 / 16)
    np.testing.assert_allclose(update["w"], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.momentum["w"], momentum, rtol=1e-5, atol=1e-7)
