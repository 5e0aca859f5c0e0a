"""Metrics to `metrics.jsonl`, TensorBoard event files and the console (process 0 only).

metrics.jsonl is strict JSON: a NaN or infinite value is written as null and its key listed
under "nonfinite". TensorBoard files are written with the `tensorboard` package's own event
writer, so no TensorFlow is needed.

A bucket (gs://) workdir cannot append to an object: both files are written to a local staging
directory and every write uploads the changed ones whole (`_Staging`), so the bucket always holds
complete files (TensorBoard reads them from gs:// with gcsfs installed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any

from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

METRICS_FILE = "metrics.jsonl"
# Records a resumed run trains again (after the step it resumed from), moved out of METRICS_FILE.
REPLACED_FILE = "metrics.replaced.jsonl"


def _plain(value: Any) -> Any:
  """A JSON-friendly Python scalar (floats rounded to 6 significant digits)."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and math.isfinite(value):
    return float(f"{value:.6g}")
  return value


def _strict(record: dict[str, Any]) -> dict[str, Any]:
  """`record` with NaN and infinite floats as None, their keys listed under "nonfinite"."""
  bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
  if not bad:
    return record
  return {**{k: None if k in bad else v for k, v in record.items()}, "nonfinite": bad}


def _replace_text(path: epath.Path, text: str) -> None:
  """Writes `path` whole through a temporary sibling renamed over it (atomic on a local disk)."""
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def drop_after(workdir: str, step: int) -> int:
  """Moves the records of metrics.jsonl after `step` to metrics.replaced.jsonl (appended).

  A run that resumes from the checkpoint at `step` writes those steps again, so that each
  (step, split, weights) appears once in metrics.jsonl. Returns the number of records moved.
  Works on local and bucket workdirs (each file is rewritten whole).
  """
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return 0
  kept, moved = [], []
  for line in path.read_text().splitlines(keepends=True):
    try:
      later = int(json.loads(line)["step"]) > step
    except (ValueError, KeyError, TypeError):
      later = False  # not a record: left where it is
    (moved if later else kept).append(line)
  if moved:
    replaced = epath.Path(workdir) / REPLACED_FILE
    earlier = replaced.read_text() if replaced.exists() else ""
    _replace_text(replaced, earlier + "".join(moved))
    _replace_text(path, "".join(kept))
  return len(moved)


class _Staging:
  """Where the writer's files are written: the workdir itself, or for a bucket workdir a local
  directory whose changed files `upload` copies whole to the bucket."""

  def __init__(self, workdir: str):
    self.remote = epath.Path(workdir)
    self.is_bucket = "://" in workdir
    self.dir = tempfile.mkdtemp(prefix="md4-metrics-") if self.is_bucket else workdir
    self._uploaded: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)
    if self.is_bucket:
      logging.info("metrics of %s are staged in %s and uploaded whole on every write",
                   workdir, self.dir)
      if (self.remote / METRICS_FILE).exists():  # a resumed run appends to the bucket's records
        epath.Path(self.dir, METRICS_FILE).write_bytes((self.remote / METRICS_FILE).read_bytes())
    os.makedirs(self.dir, exist_ok=True)

  def upload(self) -> bool:
    """Copies every file changed since its last upload; a failed copy is logged and retried at
    the next call (a transient bucket error does not stop training). True if all are up."""
    complete = True
    if not self.is_bucket:
      return complete
    for parent, _, files in os.walk(self.dir):
      for name in files:
        local = os.path.join(parent, name)
        relative, stat = os.path.relpath(local, self.dir), os.stat(local)
        if self._uploaded.get(relative) == (stat.st_size, stat.st_mtime_ns):
          continue
        target = self.remote / relative
        try:
          target.parent.mkdir(parents=True, exist_ok=True)
          target.write_bytes(epath.Path(local).read_bytes())
        except Exception as e:  # noqa: BLE001 - any storage error: keep the local copy, retry
          logging.warning("uploading %s to %s failed (%s: %s); retrying at the next write",
                          local, target, type(e).__name__, e)
          complete = False
          continue
        self._uploaded[relative] = (stat.st_size, stat.st_mtime_ns)
    return complete

  def close(self) -> None:
    """Uploads what changed; the local staging directory is removed once all of it is up."""
    if self.upload() and self.is_bucket:
      shutil.rmtree(self.dir)


class MetricWriter:
  """Appends one JSON object per call to DIR/metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, resumed_at: int | None = None):
    """`resumed_at`: the step a training run starts from; TensorBoard then drops the events
    after it (a SessionLog START), as `drop_after` does for metrics.jsonl."""
    self.enabled = enabled
    self._events: dict[str, EventFileWriter] = {}
    self._resumed_at = resumed_at
    if enabled:
      self._staging = _Staging(workdir)
      self._jsonl = open(os.path.join(self._staging.dir, METRICS_FILE), "a")  # noqa: SIM115

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    """Writes `metrics` for `split` (e.g. "train", "eval") at `step`."""
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(_strict(record), allow_nan=False) + "\n")
    self._jsonl.flush()
    if split not in self._events:
      self._events[split] = EventFileWriter(
          os.path.join(self._staging.dir, "tensorboard", split))
      if self._resumed_at is not None:
        self._events[split].add_event(event_pb2.Event(
            wall_time=time.time(), step=self._resumed_at,
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
              for k, v in record.items()
              if k not in ("step", "split") and isinstance(v, (int, float))]
    event = event_pb2.Event(wall_time=time.time(), step=int(step),
                            summary=summary_pb2.Summary(value=values))
    self._events[split].add_event(event)
    self._events[split].flush()
    self._staging.upload()
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in record.items() if k not in ("step", "split"))
    logging.info("[%s] step %d %s", split, step, shown)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      for writer in self._events.values():
        writer.close()
      self._staging.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file (a local or bucket path), each with `step` and `split`.

  A line that is not such a record is a ValueError naming the file and line.
  """
  records = []
  for number, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      record["step"], record["split"] = int(record["step"]), str(record["split"])
    except (ValueError, KeyError, TypeError):
      raise ValueError(f"{path}:{number}: not a metrics record (JSON with step and split)"
                       ) from None
    records.append(record)
  return records
