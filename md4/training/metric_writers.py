"""Metrics to `metrics.jsonl`, TensorBoard event files and the console (process 0 only).

metrics.jsonl is strict JSON: a NaN or infinite value is written as null and its key listed
under "nonfinite". TensorBoard files are written with the `tensorboard` package's own event
writer, so no TensorFlow is needed.
"""

from __future__ import annotations

import json
import logging
import math
import os
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


def drop_after(workdir: str, step: int) -> int:
  """Moves the records of metrics.jsonl after `step` to metrics.replaced.jsonl (appended).

  A run that resumes from the checkpoint at `step` writes those steps again, so that each
  (step, split, weights) appears once in metrics.jsonl. Returns the number of records moved.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return 0
  kept, moved = [], []
  with open(path) as f:
    for line in f:
      try:
        later = int(json.loads(line)["step"]) > step
      except (ValueError, KeyError, TypeError):
        later = False  # not a record: left where it is
      (moved if later else kept).append(line)
  if moved:
    with open(os.path.join(workdir, REPLACED_FILE), "a") as f:
      f.writelines(moved)
      f.flush()
      os.fsync(f.fileno())
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
  return len(moved)


class MetricWriter:
  """Appends one JSON object per call to DIR/metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, resumed_at: int | None = None):
    """`resumed_at`: the step a training run starts from; TensorBoard then drops the events
    after it (a SessionLog START), as `drop_after` does for metrics.jsonl."""
    self.enabled = enabled
    self._events: dict[str, EventFileWriter] = {}
    self._workdir = workdir
    self._resumed_at = resumed_at
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")  # noqa: SIM115

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    """Writes `metrics` for `split` (e.g. "train", "eval") at `step`."""
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(_strict(record), allow_nan=False) + "\n")
    self._jsonl.flush()
    if split not in self._events:
      self._events[split] = EventFileWriter(os.path.join(self._workdir, "tensorboard", split))
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
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in record.items() if k not in ("step", "split"))
    logging.info("[%s] step %d %s", split, step, shown)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      for writer in self._events.values():
        writer.close()


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
