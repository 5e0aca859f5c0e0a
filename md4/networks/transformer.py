"""A time-conditioned transformer over token sequences.

Pre-norm blocks with rotary position embeddings, a fused QKV projection, a gated (SwiGLU) or
squared-ReLU MLP, LayerNorm or RMSNorm, and adaLN-Zero time conditioning (DiT style): a
sinusoidal embedding of t goes through an MLP to a vector c, and every block's norms are shifted
and scaled, and its residual branches gated, by a zero-initialised projection of c, so that each
block starts as the identity. Attention is
bidirectional unless `causal`, computed by the backend `attention` picks for the platform
(md4/networks/attention.py). The output head can be evaluated at a few positions of each row only
(`head_index`), which matters when the vocabulary is large and a loss needs few positions; it
multiplies in the activation dtype with float32 accumulation and returns float32 logits. Its
vocabulary axis may be padded (`padded_vocab`, e.g. to a multiple of 128): the padded columns'
logits are -inf, so no softmax, loss or sampler sees them.

The module knows nothing of diffusion: it maps (tokens, t) to logits.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from md4.networks import partitioning
from md4.networks.attention import attention
from md4.networks.matmul import dense_dot_general, matmul

Array = jax.Array

TIME_FREQ_DIM = 256  # width of the sinusoidal time features
TIME_SCALE = 1000.0  # t in [0, 1] is scaled to [0, 1000] before the sinusoids
ROPE_BASE = 10000.0


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def timestep_embedding(t: Array, dim: int = TIME_FREQ_DIM) -> Array:
  """Sinusoidal features of t (float[B] in [0, 1]) -> float32[B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = TIME_SCALE * t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_tables(seq_len: int, head_dim: int) -> tuple[Array, Array]:
  """cos and sin tables float32[L, head_dim] for rotary embeddings (rotate-half layout)."""
  inv_freq = ROPE_BASE ** (-np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
  angles = np.arange(seq_len, dtype=np.float32)[:, None] * inv_freq[None]  # [L, Dh/2]
  angles = np.concatenate([angles, angles], axis=-1)  # [L, Dh]
  return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates x[B, L, H, Dh] by position; cos, sin are [L, Dh]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[:, None].astype(x.dtype)
  sin = sin[:, None].astype(x.dtype)
  return x * cos + rotated * sin


def _dense(features: int, name: str, dtype: Any, matmul_dtype: Any = None,
           **kwargs) -> nn.Dense:
  """A float32-parameter dense layer computing in `dtype`, with the CPU-friendly gradient and
  its products' operands in `matmul_dtype` (None: `dtype`)."""
  dot_general = functools.partial(dense_dot_general, operand_dtype=matmul_dtype)
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  dot_general=dot_general, **kwargs)


def _norm(kind: str, name: str, dtype: Any, affine: bool) -> nn.Module:
  """LayerNorm or RMSNorm (float32 parameters); without scale and bias when not `affine`."""
  if kind == "rmsnorm":
    return nn.RMSNorm(use_scale=affine, dtype=dtype, param_dtype=jnp.float32, name=name)
  return nn.LayerNorm(use_scale=affine, use_bias=affine, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


def _mlp_hidden(mlp: str, width: int, mlp_ratio: float) -> int:
  """Hidden width: ratio * width for squared ReLU; 2/3 of that, rounded up to a multiple of 32,
  for SwiGLU's two projections (about the same parameter count)."""
  if mlp == "relu2":
    return int(mlp_ratio * width)
  return 32 * math.ceil(2 / 3 * mlp_ratio * width / 32)


def local_mix(h: Array, kernel: Array, causal: bool) -> Array:
  """Depthwise convolution along the sequence: out[b, i] = sum_k kernel[k] * h[b, i + k - c]
  (zero outside the sequence), with c = K - 1 when causal (offsets -(K-1)..0), else (K - 1) // 2.
  h[B, L, D], kernel[K, D]."""
  size, seq_len = kernel.shape[0], h.shape[1]
  left = size - 1 if causal else (size - 1) // 2
  padded = jnp.pad(h, ((0, 0), (left, size - 1 - left), (0, 0)))
  kernel = kernel.astype(h.dtype)
  return sum(padded[:, k:k + seq_len] * kernel[k] for k in range(size))


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
  """x[B, L, D] * (1 + scale[B, D]) + shift[B, D]."""
  return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
  """One pre-norm block; adaLN-Zero modulated by `cond` [B, D] when time_conditioning."""

  width: int
  num_heads: int
  mlp_hidden: int
  dropout: float
  causal: bool
  time_conditioning: bool
  dtype: Any
  matmul_dtype: Any
  mlp: str
  norm: str
  attention: str
  local_mix: int

  @nn.compact
  def __call__(self, x: Array, cond: Array | None, cos: Array, sin: Array,
               train: bool) -> Array:
    batch, seq_len, width = x.shape
    head_dim = width // self.num_heads
    dense = functools.partial(_dense, dtype=self.dtype, matmul_dtype=self.matmul_dtype)
    # With time conditioning the modulation supplies the norms' scale and shift.
    norm = functools.partial(_norm, self.norm, dtype=self.dtype,
                             affine=not self.time_conditioning)

    if self.time_conditioning:
      mod = dense(6 * width, "modulation", kernel_init=nn.initializers.zeros)(nn.silu(cond))
      shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)  # [B, D] each
      h = _modulate(norm("norm1")(x), shift1, scale1)
    else:
      h = norm("norm1")(x)

    # Attention.
    qkv = dense(3 * width, "qkv", use_bias=False)(h)
    qkv = qkv.reshape(batch, seq_len, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, Dh]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    mixed = attention(q, k, v, self.causal, self.attention).reshape(batch, seq_len, width)
    if self.local_mix:  # a local branch beside attention, sharing its output projection
      kernel = self.param("local_mix", nn.initializers.zeros, (self.local_mix, width),
                          jnp.float32)
      mixed = mixed + local_mix(h, kernel, self.causal)
    h = dense(width, "attn_out")(mixed)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    x = x + (gate1[:, None] * h if self.time_conditioning else h)

    # MLP: SwiGLU silu(h W_gate) * (h W_up), or squared ReLU relu(h W_up)^2.
    h = norm("norm2")(x)
    if self.time_conditioning:
      h = _modulate(h, shift2, scale2)
    up = dense(self.mlp_hidden, "mlp_up", use_bias=False)(h)
    if self.mlp == "relu2":
      h = jnp.square(nn.relu(up))
    else:
      h = nn.silu(dense(self.mlp_hidden, "mlp_gate", use_bias=False)(h)) * up
    h = dense(width, "mlp_out")(h)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return x + (gate2[:, None] * h if self.time_conditioning else h)


class _HeadParams(nn.Module):
  """The head's kernel [D, N] and bias [N] (zero-initialised, float32), applied by the caller."""

  features: int

  @nn.compact
  def __call__(self, width: int) -> tuple[Array, Array]:
    zeros = nn.initializers.zeros
    return (self.param("kernel", zeros, (width, self.features), jnp.float32),
            self.param("bias", zeros, (self.features,), jnp.float32))


def gather_groups(x: Array, index: Array) -> Array:
  """x[B, L, D] at index: int[G, C], flat positions within each of G equal groups of
  consecutive rows (G = B: positions in each row) -> [G, C, D]; a gather local to each group."""
  groups = x.reshape(index.shape[0], -1, x.shape[-1])
  return jnp.take_along_axis(groups, index[..., None], axis=1)


class Transformer(nn.Module):
  """Time-conditioned transformer: tokens int[B, L] (ids < num_embeddings), t float[B] -> logits.

  Logits are float32[B, L, N] with N = padded_vocab or vocab_size (columns >= vocab_size are
  -inf). With `head_index` they are [B, N] at one position per row (int[B]), or [G, C, N] at
  int[G, C], flat positions within each of G equal groups of consecutive rows (`gather_groups`).
  With `head_reduce`, the call returns `head_reduce(head)` instead, where `head(index)` is the
  head at `index` (None: every position) on this call's features: a loss can then choose between
  heads (e.g. in a `lax.cond`) without running the trunk twice. Parameters
  are always float32; `dtype` sets the activation and matmul dtype; `matmul_dtype` (e.g. bfloat16
  with float32 `dtype`) only that of the dense layers' operands, which then accumulate in float32.
  """

  vocab_size: int
  num_embeddings: int
  width: int = 256
  depth: int = 6
  num_heads: int = 8
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  time_conditioning: bool = True
  causal: bool = False
  remat: bool = False
  matmul_dtype: Any = None
  mlp: str = "swiglu"  # swiglu | relu2
  norm: str = "layernorm"  # layernorm | rmsnorm
  attention: str = "auto"  # auto | xla | cudnn | splash | cpu (md4/networks/attention.py)
  padded_vocab: int | None = None  # head columns (>= vocab_size); None: vocab_size
  local_mix: int = 0  # > 0: each block's local branch of this kernel size (`local_mix`)

  @nn.compact
  def __call__(self, tokens: Array, t: Array | None = None, *, head_index: Array | None = None,
               head_reduce: Any = None, train: bool = False) -> Array:
    batch, seq_len = tokens.shape
    if self.width % self.num_heads or (self.width // self.num_heads) % 2:
      raise ValueError(f"width {self.width} must split into {self.num_heads} even-sized heads")
    mlp_hidden = _mlp_hidden(self.mlp, self.width, self.mlp_ratio)
    dense = functools.partial(_dense, dtype=self.dtype, matmul_dtype=self.matmul_dtype)

    # The residual stream stays float32; norms cast to `dtype` before each matmul.
    x = nn.Embed(self.num_embeddings, self.width, dtype=jnp.float32, param_dtype=jnp.float32,
                 name="embed")(tokens)  # [B, L, D]
    x = partitioning.constrain_batch(x)

    cond = None
    if self.time_conditioning:
      if t is None:
        raise ValueError("time_conditioning=True needs t")
      t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
      cond = dense(self.width, "time_mlp_in")(timestep_embedding(t))
      cond = dense(self.width, "time_mlp_out")(nn.silu(cond))  # [B, D]

    cos, sin = rope_tables(seq_len, self.width // self.num_heads)
    block_cls = nn.remat(Block, static_argnums=(5,)) if self.remat else Block
    for i in range(self.depth):
      x = block_cls(self.width, self.num_heads, mlp_hidden, self.dropout, self.causal,
                    self.time_conditioning, self.dtype, self.matmul_dtype, self.mlp, self.norm,
                    self.attention, self.local_mix, name=f"block_{i}")(x, cond, cos, sin, train)
      x = partitioning.constrain_batch(x)

    # Final norm (per position, so before any gather) and the head.
    if self.time_conditioning:
      mod = dense(2 * self.width, "final_modulation",
                  kernel_init=nn.initializers.zeros)(nn.silu(cond))
      shift, scale = jnp.split(mod, 2, axis=-1)  # [B, D] each
      x = _modulate(_norm(self.norm, "final_norm", self.dtype, affine=False)(x), shift, scale)
    else:
      x = _norm(self.norm, "final_norm", self.dtype, affine=True)(x)
    columns = self.padded_vocab or self.vocab_size
    if columns < self.vocab_size:
      raise ValueError(f"padded_vocab {columns} is below vocab_size {self.vocab_size}")
    kernel, bias = _HeadParams(columns, name="head")(self.width)
    operand_dtype = self.matmul_dtype or self.dtype
    x = x.astype(operand_dtype)

    def head(index: Array | None) -> Array:
      h = x if index is None else gather_groups(x, jnp.asarray(index).reshape(len(index), -1))
      logits = matmul(h, kernel, operand_dtype, jnp.float32, bias)
      if columns > self.vocab_size:
        logits = jnp.where(jnp.arange(columns) < self.vocab_size, logits, -jnp.inf)
      logits = partitioning.constrain_batch(logits)
      if index is not None and jnp.ndim(index) == 1:
        return logits[:, 0]
      return logits

    if head_reduce is not None:
      return head_reduce(head)
    return head(head_index)
