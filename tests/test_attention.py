"""Attention backends (md4/networks/attention.py): every kernel equals the reference softmax
attention in values and gradients; `auto` picks the platform's kernel; fallbacks say why."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4.networks import attention as attn


def reference(q, k, v, causal):
  """softmax(q k^T / sqrt(d)) v in float32 numpy-style einsums, [B, L, H, Dh]."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST) / q.shape[-1]**0.5
  if causal:
    s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v,
                    precision=jax.lax.Precision.HIGHEST)


def value_and_grads(fn, q, k, v, d_out):
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(d_out)


def check_backend(backend, shape, causal, rtol=1e-5, atol=1e-5):
  q, k, v, d_out = jax.random.normal(jax.random.key(4), (4, *shape))  # [B, L, H, Dh] each
  out, grads = value_and_grads(jax.jit(lambda q, k, v: attn.attention(q, k, v, causal, backend)),
                               q, k, v, d_out)
  ref, ref_grads = value_and_grads(lambda q, k, v: reference(q, k, v, causal), q, k, v, d_out)
  np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol)
  for g, r in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(g, r, rtol=10 * rtol, atol=10 * atol)


@pytest.mark.parametrize("backend", ["cpu", "xla"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_cpu_and_xla_kernels_match_reference(backend, causal):
  check_backend(backend, (3, 16, 4, 8), causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_splash_kernel_in_interpret_mode_matches_reference_at_128(causal):
  # The Pallas TPU kernel itself, run by the Pallas interpreter on CPU: blocks of 128.
  check_backend("splash", (1, 128, 2, 64), causal)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_splash_kernel_in_interpret_mode_matches_reference_at_512(causal):
  check_backend("splash", (1, 512, 2, 64), causal)


def test_auto_picks_the_platform_kernel():
  pick = lambda platform, dtype, seq_len=1024, head_dim=64: attn.resolve(
      "auto", platform=platform, dtype=dtype, seq_len=seq_len, head_dim=head_dim)
  assert pick("gpu", jnp.bfloat16) == "cudnn"
  assert pick("gpu", jnp.float16) == "cudnn"
  assert pick("gpu", jnp.float32) == "xla"
  assert pick("tpu", jnp.bfloat16) == "splash"
  assert pick("cpu", jnp.float32) == "cpu"
  assert attn.resolve("cpu", platform="gpu", dtype=jnp.bfloat16, seq_len=8, head_dim=8) == "cpu"
  with pytest.raises(ValueError, match="unknown attention backend"):
    attn.resolve("flash", platform="cpu", dtype=jnp.float32, seq_len=8, head_dim=8)


@pytest.mark.parametrize("backend, platform, dtype, seq_len, head_dim, why", [
    ("splash", "tpu", jnp.bfloat16, 100, 64, "seq_len divisible by 128, not 100"),
    ("cudnn", "gpu", jnp.bfloat16, 1024, 256, "head sizes <= 128 divisible by 8, not 256"),
    ("cudnn", "gpu", jnp.float32, 1024, 64, "bfloat16 or float16, not float32"),
    ("cudnn", "cpu", jnp.bfloat16, 1024, 64, "needs a GPU"),
])
def test_unsupported_shapes_fall_back_to_xla_with_one_line(caplog, backend, platform, dtype,
                                                          seq_len, head_dim, why):
  attn._log_once.cache_clear()
  with caplog.at_level(logging.WARNING):
    for _ in range(3):  # logged once, however many layers ask
      assert attn.resolve(backend, platform=platform, dtype=dtype, seq_len=seq_len,
                          head_dim=head_dim) == "xla"
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1 and f"attention: {backend} -> xla" in lines[0] and why in lines[0], lines
