"""A time-conditioned transformer over token sequences.

Pre-norm blocks with rotary position embeddings, a fused QKV projection, a gated (SwiGLU) or
squared-ReLU MLP, LayerNorm or RMSNorm, and adaLN-Zero time conditioning (DiT style): a
sinusoidal embedding of t goes through an MLP to a vector c, and every block's norms are shifted
and scaled, and its residual branches gated, by a zero-initialised projection of c, so that each
block starts as the identity. Attention is
bidirectional unless `causal`; on CPU it is an einsum softmax with a hand-written gradient (faster
there than jax.nn.dot_product_attention, which is used on GPU/TPU). The output head can be
evaluated at a few flattened positions only (`head_index`), which matters when the vocabulary is
large and a loss needs few positions.

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

from md4.networks.matmul import dense_dot_general

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


def attention(q: Array, k: Array, v: Array, causal: bool = False,
              fused: bool | None = None) -> Array:
  """Multi-head attention on q, k, v [B, L, H, Dh] -> [B, L, H, Dh].

  `fused` (default: on accelerators) calls jax.nn.dot_product_attention, which XLA or cuDNN
  fuse; otherwise (default on CPU) a hand-written einsum softmax with a custom gradient runs,
  which is about 1.5x faster there because it never normalises the [L, L] weights.
  """
  if fused is None:
    fused = jax.default_backend() != "cpu"
  if fused:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, L, Dh]
  out = _softmax_attention(q * q.shape[-1] ** -0.5, k, v, causal)
  return out.transpose(0, 2, 1, 3)


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
    h = attention(q, k, v, self.causal)
    h = dense(width, "attn_out")(h.reshape(batch, seq_len, width))
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


class Transformer(nn.Module):
  """Time-conditioned transformer: tokens int[B, L] (ids < num_embeddings), t float[B] -> logits.

  Logits are float32[B, L, vocab_size], or head_index.shape + (vocab_size,) when `head_index`
  (indices into the flattened B * L positions) is given. Parameters are always float32; `dtype`
  sets the activation and matmul dtype; `matmul_dtype` (e.g. bfloat16 with float32 `dtype`)
  only that of the dense layers' operands, which then accumulate in float32.
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

  @nn.compact
  def __call__(self, tokens: Array, t: Array | None = None, *, head_index: Array | None = None,
               train: bool = False) -> Array:
    batch, seq_len = tokens.shape
    if self.width % self.num_heads or (self.width // self.num_heads) % 2:
      raise ValueError(f"width {self.width} must split into {self.num_heads} even-sized heads")
    mlp_hidden = _mlp_hidden(self.mlp, self.width, self.mlp_ratio)
    dense = functools.partial(_dense, dtype=self.dtype, matmul_dtype=self.matmul_dtype)

    # The residual stream stays float32; norms cast to `dtype` before each matmul.
    x = nn.Embed(self.num_embeddings, self.width, dtype=jnp.float32, param_dtype=jnp.float32,
                 name="embed")(tokens)  # [B, L, D]

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
                    name=f"block_{i}")(x, cond, cos, sin, train)

    # Final norm and head, only at the requested flattened positions when head_index is given.
    if head_index is not None:
      head_index = jnp.asarray(head_index)
      x = x.reshape(batch * seq_len, self.width)[head_index]  # head_index.shape + (D,)
    if self.time_conditioning:
      mod = dense(2 * self.width, "final_modulation",
                  kernel_init=nn.initializers.zeros)(nn.silu(cond))
      shift, scale = jnp.split(mod, 2, axis=-1)  # [B, D] each
      if head_index is None:
        shift, scale = shift[:, None], scale[:, None]
      else:
        example = head_index // seq_len
        shift, scale = shift[example], scale[example]
      x = _norm(self.norm, "final_norm", self.dtype, affine=False)(x)
      x = x * (1 + scale) + shift
    else:
      x = _norm(self.norm, "final_norm", self.dtype, affine=True)(x)
    logits = dense(self.vocab_size, "head", kernel_init=nn.initializers.zeros)(x)
    return logits.astype(jnp.float32)
