"""Multi-head attention with one backend per platform (`model.attention`).

  auto    cuDNN flash attention on GPU for bfloat16 / float16 (XLA's for float32), the Pallas
          splash-attention kernel on TPU, the hand-written kernel below on CPU
  xla     jax.nn.dot_product_attention(implementation="xla"): materialises the [B, H, L, L]
          float32 scores
  cudnn   jax.nn.dot_product_attention(implementation="cudnn"): fused, no L x L matrix in memory
  splash  jax.experimental.pallas.ops.tpu.splash_attention (blocks of 128): on TPU compiled by
          Mosaic; elsewhere run in Pallas interpret mode (slow: for checking it on CPU)
  cpu     softmax(q k^T) v as einsums with a hand-written gradient, ~1.5x faster on XLA:CPU than
          XLA's path because it never normalises the [L, L] weights

Every backend keeps the softmax statistics (max, row sums) in float32. A backend that cannot
take a shape or dtype falls back to `xla`, with one logged line saying why.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp

from md4.networks import partitioning

Array = jax.Array

BACKENDS = ("auto", "xla", "cudnn", "splash", "cpu")
SPLASH_BLOCK = 128  # the splash kernel's query and key block size


@functools.cache
def _log_once(message: str) -> None:
  logging.warning(message)


def resolve(backend: str, *, platform: str, dtype: Any, seq_len: int, head_dim: int) -> str:
  """The backend that runs: `backend`, or `auto`'s choice, or `xla` where it cannot run."""
  if backend not in BACKENDS:
    raise ValueError(f"unknown attention backend {backend!r}; known: {', '.join(BACKENDS)}")
  low_precision = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  if backend == "auto":
    backend = {"gpu": "cudnn" if low_precision else "xla", "tpu": "splash"}.get(platform, "cpu")
  reason = None
  if backend == "cudnn":
    if platform != "gpu":
      reason = f"cuDNN attention needs a GPU (platform {platform})"
    elif not low_precision:
      reason = f"cuDNN flash attention takes bfloat16 or float16, not {jnp.dtype(dtype)}"
    elif head_dim > 128 or head_dim % 8:
      reason = f"cuDNN flash attention takes head sizes <= 128 divisible by 8, not {head_dim}"
  elif backend == "splash" and seq_len % SPLASH_BLOCK:
    reason = f"splash attention needs seq_len divisible by {SPLASH_BLOCK}, not {seq_len}"
  if reason is None:
    return backend
  _log_once(f"attention: {backend} -> xla: {reason}")
  return "xla"


def attention(q: Array, k: Array, v: Array, causal: bool = False, backend: str = "auto") -> Array:
  """softmax(q k^T / sqrt(Dh)) v on q, k, v [B, L, H, Dh] -> [B, L, H, Dh], in q's dtype."""
  _, seq_len, _, head_dim = q.shape
  platform = jax.default_backend()
  backend = resolve(backend, platform=platform, dtype=q.dtype, seq_len=seq_len,
                    head_dim=head_dim)
  if backend in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=backend)
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, L, Dh]
  q = q * jnp.asarray(head_dim**-0.5, q.dtype)
  if backend == "splash":
    out = _sharded_over_batch(functools.partial(
        _splash, causal=causal, interpret=platform != "tpu"), q, k, v)
  else:
    out = _softmax_attention(q, k, v, causal)
  return out.transpose(0, 2, 1, 3)


def _sharded_over_batch(fn, *args: Array) -> Array:
  """fn on each device's rows under a batch-sharded mesh (a Pallas kernel is not partitioned by
  GSPMD, which would gather its inputs); fn itself without a mesh."""
  axes = partitioning.batch_axes()
  if not axes or not partitioning.batch_size_divides(args[0].shape[0]):
    return fn(*args)
  spec = jax.sharding.PartitionSpec(axes)
  return jax.shard_map(fn, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)


@functools.cache
def _splash_kernel(seq_len: int, num_heads: int, causal: bool, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as kernel_lib,
  )
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
  shape = (seq_len, seq_len)
  mask = mask_lib.CausalMask(shape) if causal else mask_lib.FullMask(shape)
  return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([mask] * num_heads), head_shards=1,
                                    q_seq_shards=1, interpret=interpret)


def _splash(q: Array, k: Array, v: Array, *, causal: bool, interpret: bool) -> Array:
  """The splash kernel (one example at a time, vmapped) on scaled q and k, v [B, H, L, Dh]."""
  kernel = _splash_kernel(q.shape[2], q.shape[1], causal, interpret)
  return jax.vmap(kernel)(q, k, v).astype(q.dtype)


def _probs(q: Array, k: Array, causal: bool) -> tuple[Array, Array]:
  """Unnormalised attention weights p[B, H, Lq, Lk] (q.dtype) and their row sums (float32)."""
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  if causal:
    s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, jnp.finfo(jnp.float32).min)
  p = jnp.exp(s - s.max(axis=-1, keepdims=True))
  return p.astype(q.dtype), p.sum(axis=-1, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _softmax_attention(q: Array, k: Array, v: Array, causal: bool) -> Array:
  """softmax(q k^T) v on [B, H, L, Dh] (q already scaled), normalised after the second matmul."""
  return _softmax_attention_fwd(q, k, v, causal)[0]


def _softmax_attention_fwd(q, k, v, causal):
  p, norm = _probs(q, k, causal)
  out = (jnp.einsum("bhqk,bhkd->bhqd", p, v, preferred_element_type=jnp.float32) / norm
         ).astype(q.dtype)
  return out, (q, k, v, out, p, norm)


def _softmax_attention_bwd(causal, residuals, d_out):
  # With P = p / l: dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK = dS^T Q.
  # Dividing dO by the row sums first avoids any extra pass over the [L, L] weights.
  del causal
  q, k, v, out, p, norm = residuals
  d_out = d_out.astype(jnp.float32) / norm
  delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_out = d_out.astype(q.dtype)
  # dV and dK contract the query axis of both operands; forming their [Dh, L] transposes puts
  # the [L, L] operand second, where XLA:CPU's library matmul takes it (attention's forward and
  # backward together ~14% faster at L = 256).
  dv = jnp.einsum("bhqd,bhqk->bhdk", d_out, p).swapaxes(-1, -2)
  dp = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
  ds = (p * (dp - delta)).astype(q.dtype)
  dk = jnp.einsum("bhqd,bhqk->bhdk", q, ds).swapaxes(-1, -2)
  return jnp.einsum("bhqk,bhkd->bhqd", ds, k), dk, dv


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)
