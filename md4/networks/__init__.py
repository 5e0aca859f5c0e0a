"""Flax networks; they know nothing of diffusion."""

import jax.numpy as jnp

# config string -> activation dtype (parameters are always float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
