"""Metrics to `metrics.jsonl`, TensorBoard event files and the console (process 0 only).

TensorBoard files are written with the `tensorboard` package's own event writer, so no
TensorFlow is needed.
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


def _plain(value: Any) -> Any:
  """A JSON-friendly Python scalar (floats rounded to 6 significant digits)."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and math.isfinite(value):
    return float(f"{value:.6g}")
  return value


class MetricWriter:
  """Appends one JSON object per call to DIR/metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._events: dict[str, EventFileWriter] = {}
    self._workdir = workdir
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    """Writes `metrics` for `split` (e.g. "train", "eval") at `step`."""
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if split not in self._events:
      self._events[split] = EventFileWriter(os.path.join(self._workdir, "tensorboard", split))
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
