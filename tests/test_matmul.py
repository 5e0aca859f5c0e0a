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


@pytest.mark.parametrize("x_shape,n", [((64, 24), 40), ((64, 40), 24), ((3, 16, 40), 24)])
def test_bfloat16_operands_accumulate_in_float32(x_shape, n):
  """operand_dtype=bfloat16: values and both cotangents are the float64 products of the
  bfloat16-rounded operands (float32 accumulation), in the inputs' float32 dtype."""
  kx, kw, kg = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, (x_shape[-1], n))
  g = jax.random.normal(kg, x_shape[:-1] + (n,))
  out, vjp = jax.vjp(lambda x, w: matmul(x, w, jnp.bfloat16), x, w)
  dx, dw = vjp(g)
  assert out.dtype == dx.dtype == dw.dtype == jnp.float32
  rounded = lambda a: np.asarray(a.astype(jnp.bfloat16), np.float64)
  x16, w16, g16 = rounded(x), rounded(w), rounded(g)
  np.testing.assert_allclose(out, x16 @ w16, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dx, g16 @ w16.T, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dw, x16.reshape(-1, x_shape[-1]).T @ g16.reshape(-1, n),
                             rtol=1e-5, atol=1e-4)
  # Rounding the operands is the whole difference from float32: ~2^-9 relative per element.
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  assert 1e-4 < np.abs(out - exact).max() / np.abs(exact).max() < 1e-2


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_transformer_with_bfloat16_operands_matches_float32():
  """model.matmul_dtype=bfloat16 changes only the dense products' rounding: the same params
  give logits and gradients within bfloat16 error of float32, and stay float32 throughout."""
  from md4.networks.transformer import Transformer
  tokens = jax.random.randint(jax.random.key(8), (2, 16), 0, 11)
  make = lambda dtype: Transformer(vocab_size=10, num_embeddings=11, width=32, depth=2,
                                   num_heads=2, time_conditioning=True, matmul_dtype=dtype)
  t = jnp.array([0.3, 0.8])
  params = make(None).init(jax.random.key(9), tokens, t)
  # Non-zero head and modulations, so that every layer's gradient is non-trivial.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(10), p.shape),
                        params)
  loss = lambda model: lambda p: jnp.sum(jnp.sin(model.apply(p, tokens, t)))
  full, mixed = make(None), make(jnp.bfloat16)
  out, out16 = (jax.jit(model.apply)(params, tokens, t) for model in (full, mixed))
  assert out16.dtype == jnp.float32
  assert 0 < np.abs(out16 - out).max() < 0.02 * np.abs(out).max()
  grads, grads16 = (jax.jit(jax.grad(loss(model)))(params) for model in (full, mixed))
  for g, g16 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads16), strict=True):
    assert g16.dtype == jnp.float32
    np.testing.assert_allclose(g16, g, atol=0.03 * np.abs(g).max() + 1e-6)


def test_cpu_has_amx_reads_the_cpu_flags(tmp_path):
  from md4.networks.matmul import cpu_has_amx
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
  assert cpu_has_amx(str(info))
  info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
  assert not cpu_has_amx(str(info))
  assert not cpu_has_amx(str(tmp_path / "missing"))
