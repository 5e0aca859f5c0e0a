"""Orbax checkpoints of the whole run: train state (params, optimizer, EMA, step) and data state.

Saves are atomic (Orbax writes to a temporary directory and renames it), so a run killed during a
save leaves the previous checkpoint intact. The data iterators' positions are saved with grain's
checkpoint handler: one file per process (`data/process_<i>-of-<n>.json`), so that every process
resumes its own iterator. A checkpoint that fails to restore (corrupt or partial files) is
reported and the next older one is tried; a training run moves the unreadable one aside
(`restore_latest`).
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

UNREADABLE_DIR = "unreadable"  # <checkpoints>/unreadable/<step>: checkpoints moved aside


class CheckpointError(RuntimeError):
  """No checkpoint in the directory could be restored."""


def absolute(path: str) -> epath.Path:
  """`path` made absolute; a bucket path (gs://) already is (epath's `absolute()` would put the
  working directory in front of it)."""
  path = epath.Path(path)
  return path if path.is_absolute() else path.absolute()


def has_checkpoints(directory: str) -> bool:
  """Whether `directory` (local or gs://) holds at least one finished checkpoint (without
  creating anything)."""
  path = epath.Path(directory)
  return path.is_dir() and any(child.name.isdigit() for child in path.iterdir())


class Checkpointer:
  """Periodic checkpoints in `<workdir>/checkpoints`, newest `max_to_keep` kept.

  `read_only` (eval and sample modes) creates nothing and moves nothing.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = absolute(directory)
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only, read_only=read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    self._manager.reload()
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any) -> None:
    """Saves `state` (a pytree of arrays) and this process's data iterator position at `step`."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iterator))
    self._manager.save(step, args=args, force=True)

  def restore(self, abstract_state: Any, step: int, data_iterator: Any = None, *,
              partial: bool = False) -> Any:
    """Checkpoint `step` in the structure, shapes and shardings of `abstract_state`; with
    `data_iterator`, that iterator is also set to its saved position. `partial` reads only the
    parts `abstract_state` names (eval and sample read the weights, not the optimizer's state)."""
    if partial:
      return ocp.PyTreeCheckpointer().restore(
          self.directory / str(step) / "state",
          args=ocp.args.PyTreeRestore(
              item=abstract_state, partial_restore=True,
              restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)))
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**items)).state

  def restore_latest(self, abstract_state: Any, data_iterator: Any = None, *,
                     partial: bool = False) -> tuple[int, Any] | None:
    """(step, state) of the newest readable checkpoint; None if there is none at all.

    A checkpoint that cannot be read is skipped in favour of the previous one. Unless read-only,
    the skipped ones are then moved to `<checkpoints>/unreadable/` (kept for inspection, out of
    the way of the steps that will be saved again). If none can be read, nothing is moved. A
    checkpoint whose train state has another structure (another optimizer, or an earlier
    release's) is not unreadable: it stops the restore with a CheckpointError naming the parts.
    """
    steps, skipped = self.all_steps(), []
    for step in reversed(steps):
      try:
        state = self.restore(abstract_state, step, data_iterator, partial=partial)
      except Exception as e:  # noqa: BLE001 - any failure to read means "unusable checkpoint"
        lines = str(e).splitlines() or [""]
        if "tree structures do not match" in lines[0]:
          parts = [ln[:-1] for ln in lines[1:] if ln.endswith(":") and not ln[0].isspace()]
          raise CheckpointError(
              f"the checkpoint at step {step} in {self.directory} holds a train state whose "
              f"{', '.join(parts) or 'structure'} differs from this run's (another optimizer or "
              "model, or an earlier release: md4's own Muon became optax.contrib.muon); eval and "
              "sample read its weights, but training resumes it only with the settings and "
              "release that wrote it") from None
        skipped.append((step, f"{type(e).__name__}: {lines[0]}"))
        continue
      for bad, reason in skipped:
        self._set_aside(bad, reason, step)
      return step, state
    if steps:
      raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} can be read "
                            f"(step {skipped[0][0]}: {skipped[0][1]})")
    return None

  def _set_aside(self, step: int, reason: str, fallback: int) -> None:
    """Logs (and unless read-only, moves aside) the unreadable checkpoint `step`."""
    source = self.directory / str(step)
    unreadable = f"checkpoint at step {step} ({source}) is corrupt or partial ({reason})"
    if self.read_only:
      logging.warning("%s; using step %d", unreadable, fallback)
      return
    target = self.directory / UNREADABLE_DIR / str(step)
    suffix = 1
    while target.exists():
      target, suffix = self.directory / UNREADABLE_DIR / f"{step}.{suffix}", suffix + 1
    multihost_utils.sync_global_devices(f"name the unreadable checkpoint {step}")
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      source.rename(target)
    multihost_utils.sync_global_devices(f"moved the unreadable checkpoint {step}")
    self._manager.reload()
    logging.warning("%s; moved it to %s and resuming from step %d", unreadable, target, fallback)

  def wait(self) -> None:
    """Blocks until a save in flight has finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for a save in flight to finish, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
