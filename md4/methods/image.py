"""Image methods for the training registry: Blackout Diffusion and MD4 on pixels, with a UNet.

Same protocol as the text methods (md4/methods/__init__.py), on image batches int[B, H, W, C]:
  init(rng) -> params
  loss(params, images, rng, train) -> (scalar loss, metrics with "loss")
  evaluate(params, images, rng) -> {name: float[B]}
  sample(params, rng, batch_size, known, known_mask) -> int[B, H, W, C]

Config fields read here:
  image_shape: (H, W, C), must match the data pipeline's `image_shape`.
  unet: base_channels, channel_mults, num_res_blocks, attn_resolutions, num_heads, dropout,
    dtype ("float32" | "bfloat16"), embed_dim (tokens input: MD4Pixels).
  blackout: num_steps, t_end, max_count (must match the data's max_count), weighting, sampler.
  MD4Pixels: diffusion.schedule, diffusion.num_steps; sampling.num_steps, top_p, temperature, grid.
    Class-conditional with unet.num_classes_cond = K > 0: its data is the batch
    {"images", "labels"}; training replaces labels by the null class K at the rate
    diffusion.label_dropout; samples take the class sampling.class_label (-1: the null class),
    guided with scale sampling.guidance against the null class.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from md4.diffusion import blackout, guidance, masked
from md4.diffusion.schedules import get_schedule
from md4.methods.text import diffusion_sampler
from md4.networks import DTYPES, apply_fn
from md4.networks.unet import UNet

Array = jnp.ndarray
PIXEL_VALUES = 256  # MD4 on 8-bit pixels; the mask id is 256


def build_unet(config: ml_collections.ConfigDict, **kw) -> UNet:
  u = config.unet
  return UNet(image_channels=config.image_shape[2], base_channels=u.base_channels,
              channel_mults=tuple(u.channel_mults), num_res_blocks=u.num_res_blocks,
              attn_resolutions=tuple(u.attn_resolutions), num_heads=u.num_heads,
              dropout=u.dropout, dtype=DTYPES[u.dtype], embed_dim=u.embed_dim, **kw)


@dataclasses.dataclass
class Blackout:
  """Blackout Diffusion (docs/methods.md §4) with a rate-output UNet.

  The network sees (n - (N/2) p_k) / (N/2), the input of docs/methods.md §4 scaled to about
  [-1, 1], and the time k / T; its rate output is (N/2) softplus(.), so that it starts near the
  right magnitude.
  """

  config: ml_collections.ConfigDict
  vocab_size: int  # unused beyond the registry's signature (N + 1)
  # The training loss is not a likelihood bound (unless weighting = "elbo", and then only up to a
  # constant), so nothing is reported as bits per token; evaluate() adds the full NELBO
  # (blackout.nelbo, nats per image) and it in bits per dimension as plain metrics (means).
  likelihood_metrics = ()

  def __post_init__(self):
    b = self.config.blackout
    self.process = blackout.BlackoutProcess(b.num_steps, b.t_end, b.max_count)
    self.half = b.max_count / 2
    self.model = build_unet(self.config, input_kind="counts", output_kind="rate",
                            output_scale=self.half)

  def init(self, rng: Array) -> Any:
    x = jnp.zeros((1, *self.config.image_shape), jnp.float32)
    return self.model.init(rng, x, jnp.zeros((1,)))["params"]

  def rate_fn(self, params: Any, rng: Array | None, train: bool) -> blackout.RateFn:
    """rate_fn(n: int[B, H, W, C], k: int[B]) -> float[B, H, W, C] >= 0."""
    net = apply_fn(self.model, params, rng, train)

    def rate_fn(n: Array, k: Array) -> Array:
      p_k = self.process.p[k][:, None, None, None]
      x = (n.astype(jnp.float32) - self.half * p_k) / self.half
      return net(x, k.astype(jnp.float32) / self.process.num_steps)

    return rate_fn

  def _losses(self, params, images, rng, train):
    net_rng, diffusion_rng = jax.random.split(rng)
    return blackout.loss(self.rate_fn(params, net_rng, train), images, diffusion_rng,
                         self.process, weighting=self.config.blackout.weighting)

  def loss(self, params, images, rng, train=True):
    loss = self._losses(params, images, rng, train).mean() / math.prod(images.shape[1:])
    return loss, {"loss": loss}  # per pixel channel

  def evaluate(self, params, images, rng):
    loss_rng, nelbo_rng, net_rng = jax.random.split(rng, 3)
    dims = math.prod(images.shape[1:])
    nelbo = blackout.nelbo(self.rate_fn(params, net_rng, False), images, nelbo_rng, self.process)
    return {"loss": self._losses(params, images, loss_rng, train=False) / dims,
            "nelbo": nelbo, "nelbo_bits_per_dim": nelbo / (dims * math.log(2))}

  def sample(self, params, rng, batch_size, known=None, known_mask=None):
    if known_mask is not None:
      raise ValueError("Blackout sampling has no conditioning on known pixels")
    return blackout.sample(self.rate_fn(params, None, False), rng, self.process,
                           shape=(batch_size, *self.config.image_shape),
                           sampler=self.config.blackout.sampler)


def drop_labels(rng: Array, labels: Array, rate: float, null_class: int) -> Array:
  """Label dropout: each label replaced by `null_class` with probability `rate`."""
  return jnp.where(jax.random.uniform(rng, labels.shape) < rate, null_class, labels)


@dataclasses.dataclass
class MD4Pixels:
  """MD4 (docs/methods.md §1) on the flattened 8-bit pixel channels, L = H * W * C, V = 256."""

  config: ml_collections.ConfigDict
  vocab_size: int = PIXEL_VALUES
  # Per-example nats; "bits_per_dim" is already divided by L ln 2.
  likelihood_metrics = ("nelbo",)

  def __post_init__(self):
    if self.vocab_size != PIXEL_VALUES:
      raise ValueError(f"MD4Pixels models 8-bit pixels (256 values), got vocab {self.vocab_size}")
    self.num_classes = self.config.unet.get("num_classes_cond", 0)
    self.model = build_unet(self.config, input_kind="tokens", output_kind="logits",
                            num_embeddings=PIXEL_VALUES + 1, num_classes=PIXEL_VALUES,
                            num_classes_cond=self.num_classes)
    self.schedule = get_schedule(self.config.diffusion.schedule)
    self.seq_len = math.prod(self.config.image_shape)

  def init(self, rng: Array) -> Any:
    x = jnp.zeros((1, *self.config.image_shape), jnp.int32)
    return self.model.init(rng, x, jnp.zeros((1,)))["params"]

  def _unpack(self, data: Array | dict) -> tuple[Array, Array | None]:
    """(images, labels or None) of the method's data: images, or {"images", "labels"}."""
    images, labels = (data["images"], data.get("labels")) if isinstance(data, dict) else (data,
                                                                                          None)
    if self.num_classes and labels is None:
      raise ValueError("a class-conditional md4_pixels model needs batches with labels")
    return images, labels if self.num_classes else None

  def logits_fn(self, params: Any, rng: Array | None, train: bool,
                labels: Array | None = None) -> Callable:
    """logits_fn(z: int[B, L] in 0..256, t: float[B]) -> float[B, L, 256], given the class
    labels int[B] (None: the null class) of a class-conditional model."""
    net = apply_fn(self.model, params, rng, train)

    def logits_fn(z: Array, t: Array) -> Array:
      logits = net(z.reshape(z.shape[0], *self.config.image_shape), t, labels)
      return logits.reshape(z.shape[0], self.seq_len, PIXEL_VALUES)

    return logits_fn

  def _nelbo(self, params, data, rng, train):
    net_rng, diffusion_rng, label_rng = jax.random.split(rng, 3)
    images, labels = self._unpack(data)
    if train and labels is not None:
      labels = drop_labels(label_rng, labels, self.config.diffusion.label_dropout,
                           self.num_classes)
    x = images.reshape(images.shape[0], -1)
    return masked.nelbo(self.logits_fn(params, net_rng, train, labels), x, diffusion_rng,
                        self.schedule, vocab_size=PIXEL_VALUES,
                        num_steps=self.config.diffusion.num_steps)

  def loss(self, params, data, rng, train=True):
    loss = self._nelbo(params, data, rng, train).mean() / self.seq_len  # nats per dimension
    return loss, {"loss": loss, "bits_per_dim": loss / math.log(2)}

  def evaluate(self, params, data, rng):
    nelbo = self._nelbo(params, data, rng, train=False)
    return {"nelbo": nelbo, "bits_per_dim": nelbo / (self.seq_len * math.log(2))}

  def sample_classes(self, params, rng, labels: Array | None, scale: float, batch_size: int,
                     known=None, known_mask=None) -> tuple[Array, Array]:
    """Samples of the classes `labels` int[B] (None: unconditional), guided with `scale`
    against the null class: (int[B, H, W, C], network passes)."""
    flat = lambda a: None if a is None else jnp.broadcast_to(
      a, (batch_size, *self.config.image_shape)).reshape(batch_size, -1)
    logits_fn, passes = self.logits_fn(params, None, False, labels), 1
    if scale and labels is not None:
      null = self.logits_fn(params, None, False, jnp.full_like(labels, self.num_classes))
      logits_fn, passes = guidance.guided(logits_fn, null, scale), 2
    sampler = diffusion_sampler(self.config.sampling, self.schedule, PIXEL_VALUES)
    tokens, calls = sampler(logits_fn, rng, batch_size=batch_size, seq_len=self.seq_len,
                            known=flat(known), known_mask=flat(known_mask))
    return tokens.reshape(batch_size, *self.config.image_shape), passes * calls

  def sample_with_calls(self, params, rng, batch_size, known=None, known_mask=None):
    """Samples with config.sampling (its class_label and guidance): (images, network passes)."""
    s, labels = self.config.sampling, None
    if self.num_classes and s.class_label >= 0:
      labels = jnp.full((batch_size,), s.class_label, jnp.int32)
    return self.sample_classes(params, rng, labels, s.guidance, batch_size, known, known_mask)

  def sample(self, params, rng, batch_size, known=None, known_mask=None):
    return self.sample_with_calls(params, rng, batch_size, known, known_mask)[0]
