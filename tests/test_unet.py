"""The time-conditioned UNet: shapes for both uses, rates >= 0, time and dropout dependence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4.networks.unet import UNet

# Tiny configurations: XLA's compile time on CPU dominates these tests. The middle block always
# has attention; attn_resolutions adds it at encoder/decoder levels.
SMALL = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(),
             num_heads=2, num_groups=4)


def init_key(seed):
  """A key whose random bits compile fast on CPU (threefry in a large init compiles slowly)."""
  return jax.random.key(seed, impl="unsafe_rbg")


def perturbed(params, scale=0.3, seed=1):
  """Adds Gaussian noise to every parameter, so that zero-initialised layers are non-trivial."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
    lambda p: p + scale * rng.standard_normal(p.shape).astype(np.float32), params)


@pytest.fixture(scope="module")
def rate_net():
  model = UNet(image_channels=3, input_kind="counts", output_kind="rate", output_scale=2.0,
               dropout=0.5, **SMALL)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  params = perturbed(jax.jit(model.init)(init_key(1), x, jnp.zeros(2))["params"])
  return model, params, x


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_rate_output(rate_net):
  model, params, x = rate_net
  apply = jax.jit(model.apply)
  lam = apply({"params": params}, x, jnp.array([0.1, 0.9]))
  assert lam.shape == (2, 8, 8, 3) and lam.dtype == jnp.float32
  assert float(lam.min()) >= 0
  # A different time changes the output.
  other = apply({"params": params}, x, jnp.array([0.5, 0.2]))
  assert float(jnp.abs(lam - other).mean()) > 1e-3 * float(jnp.abs(lam).mean())


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_dropout_only_when_training(rate_net):
  model, params, x = rate_net
  t = jnp.array([0.3, 0.3])
  jitted = jax.jit(model.apply, static_argnames="train")
  apply = lambda train, seed: jitted({"params": params}, x, t, train=train,
                                     rngs={"dropout": jax.random.key(seed)})
  np.testing.assert_array_equal(apply(False, 0), apply(False, 1))
  np.testing.assert_array_equal(apply(False, 0), jitted({"params": params}, x, t))
  assert float(jnp.abs(apply(True, 0) - apply(True, 1)).max()) > 1e-3
  assert float(jnp.abs(apply(True, 0) - apply(False, 0)).max()) > 1e-3


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_logits_output_odd_size():
  """MD4 on pixels: ids 0..256 (256 = mask) in, 256 logits per channel value out; 14 -> 7 -> 4."""
  model = UNet(image_channels=1, input_kind="tokens", output_kind="logits", num_embeddings=257,
               num_classes=256, embed_dim=4,
               **{**SMALL, "channel_mults": (1, 1, 1), "attn_resolutions": (7,)})
  x = jax.random.randint(jax.random.key(0), (2, 14, 14, 1), 0, 257)
  params = jax.jit(model.init)(init_key(1), x, jnp.zeros(2))["params"]
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, x, jnp.array([0.2, 0.7]))
  assert logits.shape == (2, 14, 14, 1, 256) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, 0.0)  # zero-initialised head: uniform at init
  params = perturbed(params)
  a = apply({"params": params}, x, jnp.array([0.2, 0.7]))
  b = apply({"params": params}, x, jnp.array([0.6, 0.1]))
  assert float(jnp.abs(a - b).mean()) > 1e-3 * float(jnp.abs(a).mean())
  # The input matters too (the mask id changes the output).
  c = apply({"params": params}, x.at[:, :4].set(256), jnp.array([0.2, 0.7]))
  assert float(jnp.abs(a - c).max()) > 1e-3


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_bfloat16_activations_float32_params():
  model = UNet(image_channels=1, dtype=jnp.bfloat16, **{**SMALL, "channel_mults": (1,)})
  x = jnp.ones((1, 8, 8, 1))
  params = jax.jit(model.init)(init_key(0), x, jnp.zeros(1))["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  out = jax.jit(model.apply)({"params": params}, x, jnp.zeros(1))
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


def test_time_embedding_is_the_transformers():
  """The UNet's time features are the transformer's sinusoids at its width (one function):
  cos and sin of 1000 t / 10000^(i / half), against numpy."""
  from md4.networks import transformer, unet

  assert unet.timestep_embedding is transformer.timestep_embedding
  t = np.array([0.0, 0.013, 0.5, 1.0], np.float32)
  half = SMALL["base_channels"] // 2
  args = 1000.0 * t[:, None].astype(np.float64) * 10000.0 ** (-np.arange(half) / half)
  expected = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
  got = np.asarray(transformer.timestep_embedding(jnp.asarray(t), SMALL["base_channels"]))
  np.testing.assert_allclose(got, expected, atol=2e-4)
