"""log softmax(logits)[x] with a gradient that touches the [..., V] logits once.

`jax.nn.log_softmax` followed by `take_along_axis` keeps the normalised log-probabilities as a
second [..., V] float32 array, and its gradient adds two more (the scatter of the picked entries
and `g - softmax * sum(g)`): with a 50k vocabulary each is the size of the whole trunk's
activations. Here the forward keeps only the logits and their log-sum-exp, and the backward is
one elementwise pass, g * (onehot(x) - exp(logits - lse)), that XLA fuses into its consumer (the
head's bfloat16 cast or its float32 matmul). Columns with -inf logits (a padded vocabulary) get
probability and gradient 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_vjp
def log_prob(logits: Array, x: Array) -> Array:
  """log softmax(logits)[..., x] in float32: logits [..., V], x int[...] in 0..V-1 -> [...]."""
  return _log_prob_fwd(logits, x)[0]


def _log_prob_fwd(logits: Array, x: Array) -> tuple[Array, tuple[Array, Array, Array]]:
  logits32 = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits32, axis=-1)
  picked = jnp.take_along_axis(logits32, x[..., None], axis=-1)[..., 0]
  return picked - lse, (logits, lse, x)


def _log_prob_bwd(residuals: tuple[Array, Array, Array], g: Array) -> tuple[Array, None]:
  logits, lse, x = residuals
  probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
  onehot = jnp.arange(logits.shape[-1]) == x[..., None]
  d_logits = g[..., None] * (jnp.where(onehot, 1.0, 0.0) - probs)
  return d_logits.astype(logits.dtype), None


log_prob.defvjp(_log_prob_fwd, _log_prob_bwd)
