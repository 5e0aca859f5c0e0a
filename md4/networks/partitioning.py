"""Activation sharding inside a network: batch rows over the mesh's batch axes, when there is one.

The trainer traces its step under `jax.sharding.use_abstract_mesh` (md4/training/step.py); the
modules then pin every [B, ...] activation to `P(BATCH_AXES)`, so that GSPMD gathers FSDP weights
(ZeRO-3) instead of moving activations. Without a mesh (one device, tests, sampling) they are
no-ops.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # the mesh axes that split the batch


def batch_axes() -> tuple[str, ...]:
  """The axes of the current abstract mesh that split the batch (empty without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_size_divides(batch: int) -> bool:
  """Whether the batch axes of the current mesh split `batch` rows evenly."""
  return batch % batch_shards() == 0


def batch_shards(batch: int | None = None) -> int:
  """How many pieces the current mesh splits the batch into (1 without a mesh, or when it
  does not divide `batch`)."""
  mesh = jax.sharding.get_abstract_mesh()
  shards = 1
  for a in batch_axes():
    shards *= mesh.shape[a]
  return 1 if batch is not None and batch % shards else shards


def constrain_batch(x: jax.Array) -> jax.Array:
  """x[B, ...] with its leading axis split over the mesh's batch axes (no-op without a mesh)."""
  axes = batch_axes()
  if not axes or not batch_size_divides(x.shape[0]):
    return x
  return jax.lax.with_sharding_constraint(x, P(axes))
