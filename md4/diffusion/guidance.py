"""Classifier-free guidance for discrete diffusion (Nisonoff et al. 2024; Schiff et al. 2025) as
a logits_fn combinator, so that every sampler can use it.

The guided logits are (1 + g) log mu_cond - g log mu_uncond (log-softmax of each branch), i.e.
mu_guided proportional to mu_cond^(1 + g) / mu_uncond^g per position. g = 0 is the conditional
network itself. Each call of the guided logits_fn evaluates both branches (two network passes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from md4.diffusion.masked import LogitsFn

Array = jnp.ndarray


def guided(cond_fn: LogitsFn, uncond_fn: LogitsFn, scale: float) -> LogitsFn:
  """logits_fn(z, t) of the guided distribution; `cond_fn` itself when scale == 0."""
  if scale == 0:
    return cond_fn

  def logits_fn(z: Array, t: Array) -> Array:
    cond = jax.nn.log_softmax(cond_fn(z, t).astype(jnp.float32), axis=-1)
    uncond = jax.nn.log_softmax(uncond_fn(z, t).astype(jnp.float32), axis=-1)
    return jnp.where(jnp.isfinite(cond), (1.0 + scale) * cond - scale * uncond, -jnp.inf)

  return logits_fn


def without(logits_fn: LogitsFn, hidden: Array, mask_id: int) -> LogitsFn:
  """The unconditional branch of prompt guidance: logits_fn seeing the positions `hidden`
  (bool[B, L] or [L], e.g. the prompt) masked."""
  return lambda z, t: logits_fn(jnp.where(hidden, mask_id, z), t)
