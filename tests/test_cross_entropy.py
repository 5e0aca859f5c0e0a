"""md4.diffusion.cross_entropy.log_prob against log_softmax + take_along_axis, and the head's
memory: its gradient stores no float32 [tokens, V] copy beyond the logits."""

import jax
import jax.numpy as jnp
import numpy as np

from md4.diffusion.cross_entropy import log_prob
from md4.networks.matmul import matmul


def reference(logits, x):
  return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), x[..., None], axis=-1)[..., 0]


def test_value_and_gradient_match_log_softmax_with_padded_columns():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  logits = 4 * jax.random.normal(k1, (3, 5, 11))
  logits = jnp.where(jnp.arange(11) < 9, logits, -jnp.inf)  # two padded columns
  x = jax.random.randint(k2, (3, 5), 0, 9)
  w = jax.random.normal(k3, (3, 5))
  np.testing.assert_allclose(log_prob(logits, x), reference(logits, x), rtol=1e-6, atol=1e-6)
  grad = jax.grad(lambda z: jnp.sum(w * log_prob(z, x)))(logits)
  want = jax.grad(lambda z: jnp.sum(w * reference(z, x)))(logits)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
  assert np.all(grad[..., 9:] == 0)


def test_matmul_bias_gradient():
  kx, kw, kb, kg = jax.random.split(jax.random.key(1), 4)
  x, w = jax.random.normal(kx, (2, 7, 16)), jax.random.normal(kw, (16, 24))
  b, g = jax.random.normal(kb, (24,)), jax.random.normal(kg, (2, 7, 24))
  for dtype, tol in ((None, 1e-5), (jnp.bfloat16, 2e-2)):
    got = jax.grad(lambda x, w, b, d=dtype: jnp.sum(g * matmul(x, w, d, jnp.float32, b)),
                   argnums=(0, 1, 2))(x, w, b)
    want = jax.grad(lambda x, w, b: jnp.sum(g * (x @ w + b)), argnums=(0, 1, 2))(x, w, b)
    for a, e in zip(got, want, strict=True):
      np.testing.assert_allclose(a, e, rtol=tol, atol=tol * np.abs(e).max())


def test_head_gradient_keeps_one_float32_logits_copy():
  tokens, width, vocab = 2048, 64, 50304
  logit_bytes = tokens * vocab * 4

  def pad(logits):  # as the Transformer's head: 50257 real columns of 50304
    return jnp.where(jnp.arange(vocab) < 50257, logits, -jnp.inf)

  def fused(kernel, bias, h, x):
    return jnp.sum(log_prob(pad(matmul(h, kernel, jnp.bfloat16, jnp.float32, bias)), x))

  def unfused(kernel, bias, h, x):  # the head and loss as they were: bias added outside
    return jnp.sum(reference(pad(matmul(h, kernel, jnp.bfloat16, jnp.float32) + bias), x))

  shapes = (jax.ShapeDtypeStruct((width, vocab), jnp.float32),
            jax.ShapeDtypeStruct((vocab,), jnp.float32),
            jax.ShapeDtypeStruct((tokens, width), jnp.bfloat16),
            jax.ShapeDtypeStruct((tokens,), jnp.int32))
  temp = {}
  for name, fn in (("fused", fused), ("unfused", unfused)):
    step = jax.jit(jax.grad(fn, argnums=(0, 1)))
    temp[name] = step.lower(*shapes).compile().memory_analysis().temp_size_in_bytes
  # XLA:CPU: the product and the logits (2 x 4 V per token; the bfloat16 gradient reuses the
  # logits' buffer) in 2.1 logits; log_softmax's version needs a float32 copy more.
  assert temp["fused"] < 2.1 * logit_bytes
  assert temp["unfused"] - temp["fused"] > 0.9 * logit_bytes
