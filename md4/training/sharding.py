"""Device meshes and shardings: batches over (data, fsdp), large parameters over fsdp (GSPMD).

The same jitted train step runs on one CPU device and on a pod: only the mesh changes.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from md4.networks.partitioning import BATCH_AXES


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: all); -1 in one axis means "all remaining".

  Over all devices the layout is jax.make_mesh's, which follows the chips' physical topology (so
  that fsdp's all-gathers run between neighbours), as long as every process still owns a
  contiguous block of batch rows (the processes' local batches, concatenated in process order,
  form the global batch); otherwise, and for explicit `devices`, JAX's process-major order.
  """
  devices = jax.devices() if devices is None else list(devices)
  num_devices = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError("mesh: at most one of data and fsdp may be -1")
  if data == -1:
    data = num_devices // fsdp
  if fsdp == -1:
    fsdp = num_devices // data
  if data * fsdp != num_devices:
    raise ValueError(f"mesh: data={data} x fsdp={fsdp} does not match the {num_devices} devices")
  if num_devices == jax.device_count() and devices == jax.devices():
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=auto)
    processes = [d.process_index for d in mesh.devices.flat]
    if processes == sorted(processes):
      return mesh
    logging.warning("mesh: jax.make_mesh splits processes' rows; using process-major order")
  return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


DEFAULT_MIN_SIZE = 2**18  # arrays with fewer elements stay replicated


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int = DEFAULT_MIN_SIZE) -> P:
  """FSDP rule: split the largest axis divisible by the fsdp size, for arrays above min_size."""
  if fsdp == 1 or math.prod(shape) < min_size:
    return P()
  candidates = [a for a in np.argsort(shape)[::-1] if shape[a] % fsdp == 0]
  if not candidates:
    return P()
  spec = [None] * len(shape)
  spec[candidates[0]] = "fsdp"
  return P(*spec)


def state_shardings(mesh: Mesh, abstract_state: Any, min_size: int = DEFAULT_MIN_SIZE) -> Any:
  """NamedShardings for every leaf of a state pytree (params, optimizer moments, EMA)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp, min_size)), abstract_state)


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles each process's rows into one global array sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
