"""Orbax checkpoints of the whole run: train state (params, optimizer, EMA, step) and data state.

Saves are atomic (Orbax writes to a temporary directory and renames it), so a run killed during a
save leaves the previous checkpoint intact. A checkpoint that fails to restore (corrupt or partial
files) is reported and the next older one is tried.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
  """No checkpoint in the directory could be restored."""


class Checkpointer:
  """Periodic checkpoints in `<workdir>/checkpoints`, newest `max_to_keep` kept."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Saves `state` (a pytree of arrays) and the data iterator's JSON state at `step`."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state))
    self._manager.save(step, args=args, force=True)

  def restore(self, abstract_state: Any, step: int) -> tuple[Any, dict]:
    """Restores checkpoint `step` into the structure, shapes and shardings of `abstract_state`."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    return restored.state, restored.data

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """Restores the newest readable checkpoint; None if there is none at all.

    A checkpoint that cannot be read is logged and skipped in favour of the previous one.
    """
    steps = self.all_steps()
    for step in reversed(steps):
      try:
        state, data_state = self.restore(abstract_state, step)
      except Exception as e:  # noqa: BLE001 - any failure to read means "unusable checkpoint"
        logging.warning("checkpoint at step %d in %s is corrupt or partial (%s: %s); "
                        "trying the previous one", step, self.directory, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
        continue
      return step, state, data_state
    if steps:
      raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} can be read")
    return None

  def wait(self) -> None:
    """Blocks until asynchronous saves have finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing `tree`, for restoring into the same layout."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
