"""Training-curve plots: the series read back from metrics.jsonl, the PNG, and CLI errors."""

import struct

import numpy as np
import pytest

from md4.tools import plot
from md4.training.metric_writers import MetricWriter


def write_run(workdir, scale=1.0):
  """A synthetic run: train lines every 10 steps, eval (params and ema) and a sample line."""
  writer = MetricWriter(str(workdir))
  for step in range(10, 60, 10):
    writer.write(step, "train", {"loss": scale / step, "bits_per_token": 2 * scale / step,
                                 "lr": 1e-3 * step, "grad_norm": 0.5, "tokens_per_s": 1000 + step})
  for step in (30, 50):
    for weights in ("params", "ema"):
      writer.write(step, "eval", {"bits_per_token": scale * step / 100, "weights": weights,
                                  "eval_examples": 64})
  writer.write(50, "sample", {"unigram_entropy": 2.7, "weights": "ema"})
  writer.close()


def png_size(path):
  with open(path, "rb") as f:
    header = f.read(24)
  assert header[:8] == b"\x89PNG\r\n\x1a\n"
  return struct.unpack(">II", header[16:24])


def test_read_metrics_returns_the_written_values(tmp_path):
  write_run(tmp_path, scale=3.0)
  series = plot.read_metrics(str(tmp_path))
  assert set(series) == {"train", "eval/params", "eval/ema", "sample"}
  steps, values = series["train"]["bits_per_token"]
  np.testing.assert_array_equal(steps, [10, 20, 30, 40, 50])
  np.testing.assert_allclose(values, [6 / s for s in (10, 20, 30, 40, 50)], rtol=1e-6)
  steps, values = series["eval/ema"]["bits_per_token"]
  np.testing.assert_array_equal(steps, [30, 50])
  np.testing.assert_allclose(values, [0.9, 1.5])
  assert "weights" not in series["eval/ema"]  # strings are not series
  assert series["sample"]["unigram_entropy"][1].tolist() == [2.7]


def test_plot_overlays_workdirs_into_a_png(tmp_path):
  write_run(tmp_path / "a")
  write_run(tmp_path / "b", scale=2.0)
  out = tmp_path / "curves.png"
  fig = plot.plot_metrics([str(tmp_path / "a"), str(tmp_path / "b")], str(out),
                          labels=["a", "b"])
  # Four default panels in a 2 x 2 grid of 6 x 4 inches at 100 dpi.
  assert png_size(out) == (1200, 800)
  axes = fig.get_axes()
  assert [ax.get_title() for ax in axes] == ["bits_per_token", "lr", "grad_norm", "tokens_per_s"]
  lines = {line.get_label(): line for line in axes[0].get_lines()}
  assert set(lines) == {f"{r} {c}" for r in "ab" for c in ("train", "eval/params", "eval/ema")}
  np.testing.assert_allclose(lines["b eval/ema"].get_ydata(), [0.6, 1.0])


def test_text_runs_are_plotted_per_character(tmp_path):
  writer = MetricWriter(str(tmp_path))
  for step in (10, 20):
    writer.write(step, "train", {"bits_per_token": 6.0, "bits_per_char": 2.0, "lr": 1e-3})
  writer.close()
  fig = plot.plot_metrics([str(tmp_path)], str(tmp_path / "c.png"))
  assert [ax.get_title() for ax in fig.get_axes()] == ["bits_per_char", "lr"]


def test_plot_one_metric(tmp_path):
  write_run(tmp_path)
  out = tmp_path / "entropy.png"
  fig = plot.plot_metrics([str(tmp_path)], str(out), metrics=["unigram_entropy"])
  assert png_size(out) == (600, 400)
  assert [line.get_label() for line in fig.get_axes()[0].get_lines()] == ["sample"]


@pytest.mark.parametrize("content, message", [
    (None, "no metrics.jsonl in"),
    ("", "has no metrics"),
    ('{"step": 1}\n', ":1: not a metrics record"),
])
def test_bad_workdir_is_one_error_line(tmp_path, capsys, content, message):
  if content is not None:
    (tmp_path / "metrics.jsonl").write_text(content)
  assert plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
  assert not (tmp_path / "x.png").exists()


def test_unknown_metric_is_one_error_line(tmp_path, capsys):
  write_run(tmp_path)
  assert plot.main([str(tmp_path), "--metric", "nope", "--out", str(tmp_path / "x.png")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: metric nope not in any metrics.jsonl") and "\n" not in err


def test_cli_writes_the_png(tmp_path, capsys):
  write_run(tmp_path)
  out = str(tmp_path / "c.png")
  assert plot.main([str(tmp_path), "--out", out]) == 0
  assert capsys.readouterr().out.strip() == out
  assert png_size(out) == (1200, 800)


def test_time_axis_sums_the_seconds_per_step(tmp_path):
  writer = MetricWriter(str(tmp_path))
  for step, step_s in ((10, 6.0), (20, 3.0), (40, 1.5)):  # 1, 0.5 and 0.5 minutes of steps
    writer.write(step, "train", {"bits_per_token": 1.0, "step_s": step_s})
  writer.write(30, "eval", {"bits_per_token": 0.5, "weights": "ema"})
  writer.close()
  fig = plot.plot_metrics([str(tmp_path)], str(tmp_path / "t.png"), metrics=["bits_per_token"],
                          x=("step", "time"))
  by_step, by_time = fig.get_axes()
  assert (by_step.get_xlabel(), by_time.get_xlabel()) == ("step", "training minutes")
  np.testing.assert_array_equal(by_step.get_lines()[0].get_xdata(), [10, 20, 40])
  lines = {line.get_label(): line for line in by_time.get_lines()}
  np.testing.assert_allclose(lines["train"].get_xdata(), [1.0, 1.5, 2.0])
  np.testing.assert_allclose(lines["eval/ema"].get_xdata(), [1.75])  # halfway from 20 to 40
  fig = plot.plot_metrics([str(tmp_path)], str(tmp_path / "e.png"), metrics=["bits_per_token"],
                          curves=["eval/ema"])
  assert [line.get_label() for line in fig.get_axes()[0].get_lines()] == ["eval/ema"]
  write_run(tmp_path / "old")  # no step_s
  with pytest.raises(ValueError, match="step_s"):
    plot.plot_metrics([str(tmp_path / "old")], str(tmp_path / "o.png"), x=("time",))
