"""MD4 on pixels with an exact oracle on a tiny image problem: NELBO = -log p, bits per dim."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from md4 import config_lib
from md4.methods import image
from tests import oracle

# Tiny 2 x 2 grey images whose pixels are 0 or 255: p over the 16 images.
SHAPE = (2, 2, 1)
P = oracle.random_distribution(5, 2, 4)
TABLE = jnp.asarray(oracle.masked_conditional_table(P))  # [(2+1)^4, 4, 2]


def oracle_logits_fn(z, t):
  """The exact conditionals, spread onto the 256 pixel values (only 0 and 255 are possible)."""
  del t
  small = jnp.select([z == 0, z == 255], [0, 1], 2)  # pixel value -> {0, 1}, mask (256) -> 2
  logits = TABLE[oracle.state_index(small, 3)]  # [B, L, 2]
  full = jnp.full((*z.shape, 256), -1e9)
  return full.at[..., 0].set(logits[..., 0]).at[..., 255].set(logits[..., 1])


def make_method():
  config = config_lib.base()
  config.model_type = "md4_pixels"
  config.image_shape = SHAPE
  config.unet.update(base_channels=8, channel_mults=(1,), attn_resolutions=())
  method = image.MD4Pixels(config, 256)
  method.logits_fn = lambda params, rng, train, labels=None: oracle_logits_fn
  return method


def test_md4_pixels_nelbo_matches_negative_log_likelihood_with_oracle():
  method = make_method()
  index = int(np.argmax(P))
  bits = np.array(np.unravel_index(index, P.shape))
  image = jnp.asarray(bits * 255).reshape(1, *SHAPE)
  images = jnp.tile(image, (256, 1, 1, 1))
  evaluate = jax.jit(lambda rng: method.evaluate(None, images, rng))
  outs = [evaluate(jax.random.key(i)) for i in range(100)]
  means = np.array([o["nelbo"].mean() for o in outs])
  mean, se = means.mean(), means.std(ddof=1) / math.sqrt(len(means))
  target = -math.log(P.reshape(-1)[index])
  assert abs(mean - target) < 4 * se + 1e-2, (mean, se, target)
  bits_per_dim = np.mean([o["bits_per_dim"].mean() for o in outs])
  assert np.isclose(bits_per_dim, mean / (4 * math.log(2)), rtol=1e-5)
