"""The dense layers' matmul: same values and gradients as x @ w, whichever operand is transposed."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4.networks.matmul import dense_dot_general, matmul


@pytest.mark.parametrize("x_shape,n", [((64, 24), 40), ((64, 40), 24), ((3, 16, 40), 24)])
def test_values_and_gradients_match_autodiff_of_x_at_w(x_shape, n):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, (x_shape[-1], n))
  g = jax.random.normal(kg, x_shape[:-1] + (n,))
  out, vjp = jax.vjp(matmul, x, w)
  ref, ref_vjp = jax.vjp(jnp.matmul, x, w)
  np.testing.assert_array_equal(out, ref)
  for got, want in zip(vjp(g), ref_vjp(g), strict=True):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # And against float64 sums written out: dx = g w^T, dw = sum over rows of x^T g.
  x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
  np.testing.assert_allclose(vjp(g)[0], g64 @ w64.T, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(vjp(g)[1], x64.reshape(-1, x_shape[-1]).T @ g64.reshape(-1, n),
                             rtol=1e-5, atol=1e-4)


def test_bfloat16_cotangents_keep_the_input_dtypes():
  x = jax.random.normal(jax.random.key(1), (32, 48), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(2), (48, 16), jnp.bfloat16)
  dx, dw = jax.grad(lambda x, w: matmul(x, w).astype(jnp.float32).sum(), argnums=(0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dw, np.float32),
                             np.asarray(x, np.float32).sum(0)[:, None].repeat(16, 1), rtol=2e-2)


def test_flax_dense_with_it_equals_plain_dense():
  x = jax.random.normal(jax.random.key(3), (4, 8, 24))
  plain, custom = nn.Dense(40), nn.Dense(40, dot_general=dense_dot_general)
  params = plain.init(jax.random.key(4), x)
  loss = lambda model: lambda p: jnp.sum(jnp.sin(model.apply(p, x)))
  np.testing.assert_array_equal(custom.apply(params, x), plain.apply(params, x))
  got, want = jax.grad(loss(custom))(params), jax.grad(loss(plain))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_other_contractions_fall_back_to_lax():
  a = jax.random.normal(jax.random.key(5), (6, 5))
  b = jax.random.normal(jax.random.key(6), (4, 5))
  np.testing.assert_allclose(dense_dot_general(a, b, (((1,), (1,)), ((), ()))), a @ b.T,
                             rtol=1e-6)
