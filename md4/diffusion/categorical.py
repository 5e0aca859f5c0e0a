"""Categorical draws for the samplers: temperature, top-k and nucleus (top-p) filtering, float32
noise."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jnp.ndarray


def adjust_logits(logits: Array, *, temperature: float = 1.0, top_p: float | None = None,
                  top_k: int | None = None) -> Array:
  """Applies temperature, keeps the top_k largest logits, then the smallest set of the remaining
  tokens whose mass reaches top_p.

  Works on the last axis, in float32. Tokens filtered out get -inf; ties at the k-th largest
  logit are all kept.
  """
  logits = logits.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  if top_k is not None and 0 < top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if top_p is None or top_p >= 1.0:
    return logits
  probs = jax.nn.softmax(logits, axis=-1)
  sorted_probs = jnp.sort(probs, axis=-1)[..., ::-1]
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  # The smallest kept probability: the last token whose preceding mass is still below top_p.
  kept = mass_before < top_p
  threshold = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(probs >= threshold, logits, -jnp.inf)


def sample_categorical(rng: Array, logits: Array) -> Array:
  """Draws one index per row of `logits` (last axis) with float32 Gumbel noise.

  Low-precision Gumbel noise truncates the tail and lowers sample entropy, so the noise and the
  comparison are always done in float32, whatever the network's dtype.
  """
  return jax.random.categorical(rng, logits.astype(jnp.float32), axis=-1)
