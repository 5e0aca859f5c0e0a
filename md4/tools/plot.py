"""Training curves from one or more workdirs' metrics.jsonl, as a PNG.

  python -m md4.tools.plot runs/demo [runs/other ...] --out curves.png [--metric bits_per_token ...]
      [--x step --x time]

One panel per metric and x axis; train and eval curves of every workdir overlaid (eval curves
are split by the weights they used, e.g. "eval/ema"). The x axis is the step, or with `--x time`
the training time: the train lines' seconds per step (`step_s`) summed up to each point, so
compilation, evaluation and checkpoints do not count. Workdirs may be bucket paths (gs://...).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from md4.training import metric_writers

# {curve: {metric: (steps int[N], values float[N])}}, curves such as "train" or "eval/ema".
Series = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]

DEFAULT_METRICS = ("bits_per_token", "lr", "grad_norm", "tokens_per_s")
DPI = 100
PANEL_INCHES = (6.0, 4.0)
LINESTYLES = {"train": "-", "eval/params": ":", "eval/ema": "--"}


def read_metrics(workdir: str) -> Series:
  """The numeric series of workdir/metrics.jsonl, per curve and metric, in file order."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"no metrics.jsonl in {workdir}")
  points: dict[str, dict[str, list[tuple[int, float]]]] = {}
  for record in metric_writers.read_metrics(str(path)):
    step, split = record["step"], record["split"]
    curve = f"{split}/{record['weights']}" if "weights" in record and split != "sample" else split
    for name, value in record.items():
      if name not in ("step", "split") and isinstance(value, (int, float)) \
          and not isinstance(value, bool):
        points.setdefault(curve, {}).setdefault(name, []).append((step, float(value)))
  if not points:
    raise ValueError(f"{path} has no metrics")
  return {curve: {name: (np.array([s for s, _ in p]), np.array([v for _, v in p]))
                  for name, p in metrics.items()} for curve, metrics in points.items()}


def training_minutes(series: Series, steps: np.ndarray) -> np.ndarray:
  """Training time in minutes at `steps`: the train lines' step_s times their window's steps,
  summed up to each train line, and linear between them (0 at step 0)."""
  if "step_s" not in series.get("train", {}):
    raise ValueError("--x time needs train lines with step_s (written by this release's train.py)")
  logged, step_s = series["train"]["step_s"]
  windows = np.diff(logged, prepend=0)
  return np.interp(steps, np.concatenate([[0], logged]),
                   np.concatenate([[0.0], np.cumsum(windows * step_s) / 60]))


def _available(runs: Sequence[Series], metrics: Sequence[str] | None) -> list[str]:
  """The requested metrics (all must exist), or the defaults that exist (loss if no bits)."""
  present = {name for series in runs for curve in series.values() for name in curve}
  if metrics:
    missing = [m for m in metrics if m not in present]
    if missing:
      raise ValueError(f"metric {', '.join(missing)} not in any metrics.jsonl; "
                       f"available: {', '.join(sorted(present))}")
    return list(metrics)
  chosen = [m for m in DEFAULT_METRICS if m in present]
  per_unit = [m for m in ("bits_per_char", "bits_per_byte") if m in present]
  if per_unit:  # text: per character (or byte) rather than per token
    chosen = per_unit + [m for m in chosen if m != "bits_per_token"]
  elif "bits_per_token" not in present and "loss" in present:
    chosen.insert(0, "loss")
  return chosen


def plot_metrics(workdirs: Sequence[str], out: str, *, metrics: Sequence[str] | None = None,
                 labels: Sequence[str] | None = None, x: Sequence[str] = ("step",),
                 curves: Sequence[str] | None = None) -> Figure:
  """Writes a PNG of the curves of `workdirs` (one panel per metric) to `out`; returns the figure.

  Default metrics: bits_per_char or bits_per_byte (text), else bits_per_token, else loss; lr,
  grad_norm, tokens_per_s; as available. x: the x axes, each "step" or "time" (training minutes,
  `training_minutes`); every metric gets a panel per x axis. curves: only these (e.g.
  "eval/ema"); None: all.
  """
  if isinstance(x, str) or not x or set(x) - {"step", "time"}:
    raise ValueError(f"--x takes step and/or time, got {x!r}")
  if not workdirs:
    raise ValueError("no workdir given")
  labels = list(labels) if labels else [str(w).rstrip("/") for w in workdirs]
  if len(labels) != len(workdirs):
    raise ValueError(f"{len(labels)} labels for {len(workdirs)} workdirs")
  runs = [read_metrics(w) for w in workdirs]
  names = _available(runs, metrics)
  if not names:
    raise ValueError("no metric to plot")
  panels = [(name, axis) for name in names for axis in x]
  cols = min(2, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig = Figure(figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows), dpi=DPI)
  FigureCanvasAgg(fig)
  colors = [f"C{i % 10}" for i in range(len(runs))]
  for i, (name, axis) in enumerate(panels):
    ax = fig.add_subplot(rows, cols, i + 1)
    for label, series, color in zip(labels, runs, colors, strict=True):
      for curve, by_metric in series.items():
        if name not in by_metric or (curves and curve not in curves):
          continue
        steps, values = by_metric[name]
        if axis == "time":
          steps = training_minutes(series, steps)
        ax.plot(steps, values, LINESTYLES.get(curve, "-."), color=color,
                marker="o" if len(steps) < 20 else None, markersize=3,
                label=f"{label} {curve}" if len(runs) > 1 else curve)
    ax.set_title(name)
    ax.set_xlabel("step" if axis == "step" else "training minutes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  with epath.Path(out).open("wb") as f:
    fig.savefig(f, format="png", dpi=DPI)
  return fig


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m md4.tools.plot",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR")
  parser.add_argument("--out", default="curves.png", help="PNG path (default: curves.png)")
  parser.add_argument("--metric", action="append", dest="metrics",
                      help="metric to plot (repeatable); default: " + ", ".join(DEFAULT_METRICS))
  parser.add_argument("--label", action="append", dest="labels",
                      help="legend name of each workdir, in order (default: the path)")
  parser.add_argument("--curve", action="append", dest="curves",
                      help="only this curve, repeatable (train, eval/params, eval/ema, sample)")
  parser.add_argument("--x", action="append", choices=("step", "time"),
                      help="x axis, repeatable: step, or time (training minutes); default: step")
  args = parser.parse_args(argv)
  try:
    plot_metrics(args.workdirs, args.out, metrics=args.metrics, labels=args.labels,
                 x=args.x or ("step",), curves=args.curves)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
