"""Flax networks; they know nothing of diffusion."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# config string -> activation dtype (parameters are always float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def apply_fn(model: nn.Module, params: Any, rng: jax.Array | None, train: bool) -> Callable:
  """`net(*inputs, **kw)` of a Flax module and its params, with dropout only when training."""

  def net(*inputs, **kw):
    rngs = {"dropout": rng} if train and rng is not None else {}
    return model.apply({"params": params}, *inputs, train=train, rngs=rngs, **kw)

  return net
