"""gs:// workdirs: config.json through etils.epath (a mocked bucket mapped onto tmp_path), and
the workdir lock, which a bucket cannot hold."""

import logging
import os

from etils.epath import testing as epath_testing

from md4 import config_lib
from md4.training.lock import WorkdirLock


def test_config_round_trips_through_a_bucket_path(tmp_path):
  def local(fn, path, *args, **kwargs):  # gs://bucket/... -> tmp_path/bucket/...
    return fn(os.fspath(path).replace("gs://", f"{tmp_path}/"), *args, **kwargs)

  config = config_lib.base()
  config.seq_len = 77
  with epath_testing.mock_epath(open=local, exists=local, makedirs=local, mkdir=local):
    config_lib.save(config, "gs://bucket/run")
    loaded = config_lib.load("gs://bucket/run")
  assert (tmp_path / "bucket" / "run" / "config.json").is_file()
  assert loaded.seq_len == 77 and loaded.to_dict() == config_lib.load(
      str(tmp_path / "bucket" / "run")).to_dict()


def test_bucket_workdir_is_not_locked(tmp_path, monkeypatch, caplog):
  monkeypatch.chdir(tmp_path)
  with caplog.at_level(logging.WARNING):
    lock = WorkdirLock("gs://bucket/run")
    lock.release()
  assert os.listdir(tmp_path) == []  # nothing written locally
  assert sum("is not locked" in r.getMessage() for r in caplog.records) == 1
