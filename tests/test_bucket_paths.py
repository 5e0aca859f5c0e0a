"""gs:// workdirs, against a fake bucket: etils.epath's gs:// backend mocked onto a local
directory (tmp_path/bucket/...), and Orbax's two calls that bypass epath (TensorStore's GCS
kvstore and the hierarchical-namespace query of the GCS client) pointed at the same directory.
Orbax runs its own gs:// code paths (commit files instead of atomic renames); nothing reaches a
real bucket, and nothing is written to the local working directory."""

import json
import logging
import os
import re

import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils

from configs import demo
from md4 import config_lib
from md4.data import images
from md4.evaluation import inference
from md4.training import checkpoints, metric_writers, train
from md4.training.lock import WorkdirLock
from md4.training.metric_writers import MetricWriter


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The local directory behind gs:// while the test runs (gs://b/x is <bucket>/b/x); the
  working directory and the temporary directory are empty folders checked afterwards."""
  root, cwd, tmp = tmp_path / "gcs", tmp_path / "cwd", tmp_path / "tmp"
  for folder in (root, cwd, tmp):
    folder.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setattr("tempfile.tempdir", str(tmp))

  def local(path):  # gs://b/x and gs:/b/x (a normalised gs://) -> root/b/x
    return re.sub(r"^gs:/+", f"{root}/", os.fspath(path))

  def one(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def two(fn, source, target, *args, **kwargs):
    return fn(local(source), local(target), *args, **kwargs)

  def glob(fn, pattern):
    return [os.fspath(p).replace(f"{root}/", "gs://") for p in fn(local(pattern))]

  def walk(fn, top, **kwargs):
    for parent, dirs, files in fn(local(top), **kwargs):
      yield os.fspath(parent).replace(f"{root}/", "gs://"), dirs, files

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                      lambda path: {"driver": "file", "path": local(path)})
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  with epath_testing.mock_epath(open=one, exists=one, isdir=one, listdir=one, makedirs=one,
                                mkdir=one, remove=one, rmtree=one, stat=one, copy=two,
                                rename=two, replace=two, glob=glob, walk=walk):
    yield root
  assert os.listdir(cwd) == [], "a gs:// path was written as a local one"
  assert os.listdir(tmp) == [], "staging files were left behind"


def lines(path) -> list[dict]:
  return [json.loads(line) for line in open(path)]


def test_config_round_trips_through_a_bucket_path(bucket):
  config = config_lib.base()
  config.seq_len = 77
  config_lib.save(config, "gs://bucket/run")
  loaded = config_lib.load("gs://bucket/run")
  assert (bucket / "bucket" / "run" / "config.json").is_file()
  assert loaded.seq_len == 77 and loaded.to_dict() == config_lib.load(
      str(bucket / "bucket" / "run")).to_dict()


def test_bucket_workdir_is_not_locked(bucket, caplog):
  with caplog.at_level(logging.WARNING):
    lock = WorkdirLock("gs://bucket/run")
    lock.release()
  assert os.listdir(bucket) == []
  assert sum("is not locked" in r.getMessage() for r in caplog.records) == 1


def test_bucket_paths_stay_bucket_paths():
  # epath's absolute() would give <cwd>/gs:/bucket/run: checkpoints on the local disk.
  assert str(checkpoints.absolute("gs://bucket/run")) == "gs://bucket/run"
  assert str(checkpoints.absolute("run")) == os.path.join(os.getcwd(), "run")


def test_metrics_are_rewritten_whole_in_a_bucket(bucket):
  run = bucket / "bucket" / "run"
  writer = MetricWriter("gs://bucket/run")
  writer.write(1, "train", {"loss": 1.5})
  assert lines(run / "metrics.jsonl") == [{"step": 1, "split": "train", "loss": 1.5}]
  writer.write(2, "train", {"loss": float("nan")})
  writer.close()
  assert [r["step"] for r in lines(run / "metrics.jsonl")] == [1, 2]
  assert len(os.listdir(run / "tensorboard" / "train")) == 1
  # A later writer (a resumed run, eval mode) starts from the bucket's records.
  writer = MetricWriter("gs://bucket/run")
  writer.write(3, "eval_only", {"loss": 1.0})
  writer.close()
  assert [r["step"] for r in lines(run / "metrics.jsonl")] == [1, 2, 3]
  assert metric_writers.drop_after("gs://bucket/run", 1) == 2
  assert [r["step"] for r in lines(run / "metrics.jsonl")] == [1]
  assert [r["step"] for r in lines(run / "metrics.replaced.jsonl")] == [2, 3]
  assert sorted(os.listdir(run)) == ["metrics.jsonl", "metrics.replaced.jsonl", "tensorboard"]


def test_a_failed_upload_is_retried_at_the_next_write(bucket, monkeypatch, caplog):
  writer = MetricWriter("gs://bucket/run")
  def unavailable(*args):
    raise OSError("503 Service Unavailable")

  with monkeypatch.context() as patch, caplog.at_level(logging.WARNING):
    patch.setattr(epath.Path, "write_bytes", unavailable)
    writer.write(1, "train", {"loss": 1.5})
  assert "retrying at the next write" in caplog.text
  assert not (bucket / "bucket" / "run" / "metrics.jsonl").exists()
  writer.write(2, "train", {"loss": 1.0})
  writer.close()
  assert [r["step"] for r in lines(bucket / "bucket" / "run" / "metrics.jsonl")] == [1, 2]


def test_image_grid_and_checkpoint_listing_in_a_bucket(bucket):
  images.save_image_grid(np.zeros((4, 2, 2, 1), np.int32), "gs://bucket/run/samples/a.png", 255)
  assert (bucket / "bucket" / "run" / "samples" / "a.png").read_bytes()[:4] == b"\x89PNG"
  assert not checkpoints.has_checkpoints("gs://bucket/run/checkpoints")
  (bucket / "bucket" / "run" / "checkpoints" / "20").mkdir(parents=True)
  assert checkpoints.has_checkpoints("gs://bucket/run/checkpoints")


def tiny_bpe(corpus: str, steps: int):
  config = demo.get_config()
  config.data.update(path=corpus, tokenizer="bpe")
  config.vocab_size, config.seq_len = 40, 16
  config.model.update(width=32, depth=1, num_heads=2, matmul_dtype="")
  config.training.update(batch_size=8, num_steps=steps, log_every=2, eval_every=steps,
                         checkpoint_every=2)
  config.eval.update(batch_size=8, num_batches=1, weights=("ema",))
  config.sampling.update(every=steps, num_samples=2, num_steps=4)
  return config


@pytest.mark.slow
def test_train_resume_eval_sample_in_a_bucket(bucket, corpus):
  """A run with workdir gs://bucket/run trains, resumes, evaluates and samples; every file of
  it lands in the bucket (checkpoints through Orbax's gs:// path)."""
  run = bucket / "bucket" / "run"
  train.train(tiny_bpe(corpus, 4), "gs://bucket/run")
  assert sorted(os.listdir(run)) == ["checkpoints", "config.json", "metrics.jsonl", "samples",
                                     "tensorboard", "tokenizer.json"]
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
  # Orbax's commit markers, which it writes instead of renaming on gs://.
  assert (run / "checkpoints" / "4" / "commit_success.txt").is_file()
  assert (run / "checkpoints" / "4" / "data" / "process_0-of-1.json").is_file()
  tokenizer = (run / "tokenizer.json").read_text()

  train.train(tiny_bpe(corpus, 6), "gs://bucket/run")  # resumes at step 4
  records = lines(run / "metrics.jsonl")
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4", "6"]
  assert (run / "tokenizer.json").read_text() == tokenizer  # read back, not learned again
  assert sorted(os.listdir(run / "samples")) == ["step_4.txt", "step_6.txt"]
  assert {len(os.listdir(run / "tensorboard" / s)) for s in ("train", "eval", "sample")} == {2}

  config = tiny_bpe(corpus, 6)
  report = inference.eval_only(config, "gs://bucket/run")
  assert 0 < report["bits_per_token"] < 10
  assert lines(run / "metrics.jsonl")[-1]["split"] == "eval_only"
  path = inference.sample_only(config, "gs://bucket/run", prompt="the")
  assert path == "gs://bucket/run/samples/final_step_6.txt"
  assert (run / "samples" / "final_step_6.txt").read_text().startswith("the")
