"""A time-conditioned UNet over images (DDPM style).

Residual blocks (GroupNorm, SiLU, 3x3 convolutions) receive a projection of a sinusoidal time
embedding; self-attention runs at the feature-map sizes listed in `attn_resolutions`; the
encoder halves the spatial size between levels and the decoder resizes back to each skip
connection's size, so odd sizes such as 28 -> 14 -> 7 work.

Two kinds of input and output, so one module serves two methods:
  input_kind="counts": float[B, H, W, C] images (already centred and scaled by the caller).
  input_kind="tokens": int[B, H, W, C] ids in 0..num_embeddings-1; each channel value is
    embedded and the C embeddings of a pixel are concatenated.
  output_kind="rate":   float32[B, H, W, C] = output_scale * softplus(.) >= 0.
  output_kind="logits": float32[B, H, W, C, num_classes].
With `num_classes_cond` K > 0 the network is class-conditional: labels int[B] in 0..K (K is the
null class, the unconditional branch of classifier-free guidance; the default when no labels
are given) are embedded and added to the time embedding.
Parameters are float32; activations use `dtype`. The module knows nothing of diffusion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from md4.networks.transformer import timestep_embedding

Array = jax.Array

INPUT_KINDS = ("counts", "tokens")
OUTPUT_KINDS = ("rate", "logits")


def _group_norm(channels: int, num_groups: int, dtype: Any, name: str | None = None):
  return nn.GroupNorm(num_groups=math.gcd(num_groups, channels), dtype=dtype, name=name)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv twice, with the time embedding added in between, plus a skip path.

  The embedding's projection is added after the second GroupNorm: added before it, a per-channel
  constant would be removed by the normalization whenever a group holds one channel (fewer than
  2 * num_groups channels), and the block would not see t (or the class) at all.
  """

  channels: int
  dropout: float
  num_groups: int
  dtype: Any

  @nn.compact
  def __call__(self, x: Array, temb: Array, train: bool) -> Array:
    conv = lambda name, **kw: nn.Conv(self.channels, (3, 3), dtype=self.dtype, name=name, **kw)
    h = conv("conv1")(nn.silu(_group_norm(x.shape[-1], self.num_groups, self.dtype)(x)))
    h = _group_norm(self.channels, self.num_groups, self.dtype)(h)
    h = h + nn.Dense(self.channels, dtype=self.dtype, name="time")(nn.silu(temb))[:, None, None]
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv("conv2")(h)
    if x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), dtype=self.dtype, name="skip")(x)
    return x + h


class AttnBlock(nn.Module):
  """Multi-head self-attention over the H * W positions, residual."""

  num_heads: int
  num_groups: int
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    batch, height, width, channels = x.shape
    h = _group_norm(channels, self.num_groups, self.dtype)(x).reshape(batch, -1, channels)
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(h)
    return x + h.reshape(batch, height, width, channels)


class UNet(nn.Module):
  """(images, t: float[B], labels: int[B] | None) -> per-pixel rates or logits; see the module
  docstring.

  Attributes:
    image_channels: C.
    input_kind, output_kind: see the module docstring.
    num_embeddings: token ids per channel value (input_kind="tokens").
    embed_dim: embedding width per channel value (input_kind="tokens").
    num_classes: logits per channel value (output_kind="logits").
    num_classes_cond: K > 0: class-conditional on labels 0..K-1, with the null class K.
    output_scale: the rate output is output_scale * softplus(.).
    base_channels, channel_mults: level i has base_channels * channel_mults[i] channels.
    num_res_blocks: residual blocks per encoder level (decoder levels have one more).
    attn_resolutions: feature-map heights at which attention runs.
    num_heads, dropout, num_groups, dtype: as usual.
  """

  image_channels: int
  input_kind: str = "counts"
  output_kind: str = "rate"
  num_embeddings: int = 257
  embed_dim: int = 32
  num_classes: int = 256
  num_classes_cond: int = 0
  output_scale: float = 1.0
  base_channels: int = 64
  channel_mults: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (7, 8)
  num_heads: int = 4
  dropout: float = 0.0
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, t: Array, labels: Array | None = None,
               train: bool = False) -> Array:
    if self.input_kind not in INPUT_KINDS or self.output_kind not in OUTPUT_KINDS:
      raise ValueError(f"input_kind in {INPUT_KINDS}, output_kind in {OUTPUT_KINDS}; got "
                       f"{self.input_kind!r}, {self.output_kind!r}")
    batch, height, width, channels = x.shape
    if self.input_kind == "tokens":
      x = nn.Embed(self.num_embeddings, self.embed_dim, dtype=self.dtype, name="embed")(x)
      x = x.reshape(batch, height, width, channels * self.embed_dim)
    x = x.astype(self.dtype)

    temb_dim = 4 * self.base_channels
    temb = timestep_embedding(t, self.base_channels)
    temb = nn.Dense(temb_dim, dtype=self.dtype, name="time_in")(temb)
    temb = nn.Dense(temb_dim, dtype=self.dtype, name="time_out")(nn.silu(temb))
    if self.num_classes_cond:
      if labels is None:
        labels = jnp.full((batch,), self.num_classes_cond, jnp.int32)
      temb = temb + nn.Embed(self.num_classes_cond + 1, temb_dim, dtype=self.dtype,
                             name="class_embed")(labels)
    elif labels is not None:
      raise ValueError("labels given to a UNet without num_classes_cond")

    block = lambda ch: ResBlock(ch, self.dropout, self.num_groups, self.dtype)
    attn = lambda: AttnBlock(self.num_heads, self.num_groups, self.dtype)
    h = nn.Conv(self.base_channels, (3, 3), dtype=self.dtype, name="conv_in")(x)
    skips = [h]
    for level, mult in enumerate(self.channel_mults):  # encoder
      for _ in range(self.num_res_blocks):
        h = block(self.base_channels * mult)(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn()(h)
        skips.append(h)
      if level < len(self.channel_mults) - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype)(h)
        skips.append(h)

    h = block(h.shape[-1])(h, temb, train)  # middle
    h = attn()(h)
    h = block(h.shape[-1])(h, temb, train)

    for level, mult in reversed(list(enumerate(self.channel_mults))):  # decoder
      for _ in range(self.num_res_blocks + 1):
        h = block(self.base_channels * mult)(jnp.concatenate([h, skips.pop()], axis=-1), temb,
                                             train)
        if h.shape[1] in self.attn_resolutions:
          h = attn()(h)
      if level > 0:
        target = skips[-1].shape[1:3]
        h = jax.image.resize(h, (batch, *target, h.shape[-1]), method="nearest")
        h = nn.Conv(h.shape[-1], (3, 3), dtype=self.dtype)(h)

    h = nn.silu(_group_norm(h.shape[-1], self.num_groups, self.dtype)(h))
    if self.output_kind == "rate":
      out = nn.Conv(channels, (3, 3), dtype=self.dtype, name="conv_out")(h).astype(jnp.float32)
      return self.output_scale * nn.softplus(out)
    out = nn.Conv(channels * self.num_classes, (3, 3), dtype=self.dtype,
                  kernel_init=nn.initializers.zeros, name="conv_out")(h)
    return out.astype(jnp.float32).reshape(batch, height, width, channels, self.num_classes)
