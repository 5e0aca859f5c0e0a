"""A run never loses or corrupts its work (docs/runs.md), through main.py in temporary workdirs:
recovery from an unreadable checkpoint, the non-finite policy, the workdir lock, the resume guard,
bad input refused in one line with nothing written, and kill-and-resume of two processes."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from md4.training.lock import WorkdirLock
from tests.test_multiprocess import free_port, start, wait_all
from tests.test_train import TINY, final_params, main_py, read_jsonl

RUN = ["--config.training.num_steps=4", "--config.training.log_every=2",
       "--config.training.eval_every=2", "--config.training.checkpoint_every=2",
       "--config.eval.num_batches=1", "--config.sampling.every=0"]


def run_args(corpus, *extra):
  return [f"--config.data.path={corpus}", *TINY, *RUN, *extra]


def snapshot(workdir) -> dict[str, str]:
  """{relative path: sha1} of every file under workdir (the lock file, rewritten by every run
  that takes it, aside)."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      if os.path.relpath(path, workdir) != "lock":
        with open(path, "rb") as f:
          files[os.path.relpath(path, workdir)] = hashlib.sha1(f.read()).hexdigest()
  return files


def error_line(result, fragment: str) -> str:
  """The run's single error line (exit status 2, no traceback), which must contain `fragment`."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], errors
  assert fragment in errors[0], errors[0]
  return errors[0]


def strict_records(workdir, name="metrics.jsonl"):
  """The records of a metrics file, parsed as strict JSON (NaN or Infinity tokens fail)."""
  def refuse(token):
    raise ValueError(f"non-strict JSON token {token}")
  with open(os.path.join(workdir, name)) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def flat_params(workdir, step):
  return {k: np.asarray(v) for k, v in ocp.tree.to_flat_dict(final_params(workdir, step)).items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
  """A finished 4-step run (checkpoints 2 and 4) and its main.py result; tests copy it."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  result = main_py(workdir, *run_args(corpus))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


@pytest.fixture
def workdir(trained, tmp_path):
  """A copy of the trained run's workdir, free to change."""
  copy = str(tmp_path / "run")
  shutil.copytree(trained[0], copy)
  return copy


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_unreadable_checkpoint_is_moved_aside_and_training_goes_on(workdir, corpus):
  before = snapshot(workdir)
  assert "checkpoints/4/data/process_0-of-1.json" in before  # grain's per-process data state
  uninterrupted = flat_params(workdir, 4)
  records = strict_records(workdir)
  for root, _, names in os.walk(os.path.join(workdir, "checkpoints", "4", "state")):
    for name in names:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(5)
  corrupt = {k: v for k, v in snapshot(workdir).items() if k.startswith("checkpoints/4/")}

  result = main_py(workdir, *run_args(corpus))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  aside = os.path.join(workdir, "checkpoints", "unreadable", "4")
  [warning] = [line for line in result.stderr.splitlines() if "corrupt or partial" in line]
  assert f"step 4 ({workdir}/checkpoints/4)" in warning
  assert f"moved it to {aside} and resuming from step 2" in warning
  after = snapshot(workdir)
  # Kept, byte for byte, under unreadable/; step 4 trained again to the same parameters.
  assert {k.replace("unreadable/4/", "4/"): v for k, v in after.items()
          if k.startswith("checkpoints/unreadable/4/")} == corrupt
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "unreadable"]
  resumed = flat_params(workdir, 4)
  assert resumed.keys() == uninterrupted.keys()
  for k in uninterrupted:
    np.testing.assert_array_equal(resumed[k], uninterrupted[k], err_msg=str(k))
  # Each (step, split, weights) once; the replaced records (after step 2) kept in a side file.
  now = strict_records(workdir)
  keys = [(r["step"], r["split"], r.get("weights")) for r in now]
  assert len(keys) == len(set(keys)) and set(keys) == {
      (r["step"], r["split"], r.get("weights")) for r in records}
  assert strict_records(workdir, "metrics.replaced.jsonl") == [r for r in records
                                                               if r["step"] > 2]
  assert after["config.json"] == before["config.json"]


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_nonfinite_updates_are_skipped_then_the_run_stops(workdir, corpus):
  before = snapshot(workdir)
  old_metrics = open(os.path.join(workdir, "metrics.jsonl")).read()
  result = main_py(workdir, *run_args(corpus), "--config.training.num_steps=10",
                   "--config.optimizer.warmup_steps=0", "--config.optimizer.lr=1e6",
                   "--config.optimizer.muon_lr=1e6", "--config.training.max_nonfinite_steps=2")
  line = error_line(result, "non-finite updates in a row")
  assert "all skipped (training.max_nonfinite_steps=2)" in line
  last = re.search(r"Last checkpoint: step (\d+) \((\S+)\)$", line)
  assert last, line
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  assert last[2] == os.path.join(workdir, "checkpoints", last[1]) and int(last[1]) == steps[-1]
  streak, up_to = (int(s) for s in re.search(r"(\d+) non-finite updates in a row up to step (\d+)",
                                              line).groups())
  assert steps[-1] < up_to - streak + 1, (steps, line)  # nothing saved from the streak on
  assert os.path.exists(os.path.join(last[2], "state", "commit_success.txt"))  # finished, no tmp
  after = snapshot(workdir)  # checkpoints kept as they were (older ones rotate out)
  assert all(after[k] == v for k, v in before.items()
             if k in after and k.startswith("checkpoints/"))
  assert {k: v for k, v in after.items() if k.startswith("checkpoints/4/")} == {
      k: v for k, v in before.items() if k.startswith("checkpoints/4/")}
  # Appended only, strict JSON: non-finite values are null and named under "nonfinite".
  assert open(os.path.join(workdir, "metrics.jsonl")).read().startswith(old_metrics)
  records = strict_records(workdir)
  [resume] = [r for r in records if r["split"] == "resume"]
  assert resume["step"] == 4 and resume["changes"]["optimizer.lr"] == [0.006, 1e6]
  assert json.load(open(os.path.join(workdir, "config.json")))["optimizer"]["lr"] == 1e6
  skipped = [r for r in records if r["split"] == "train" and r["skipped_steps"]]
  assert skipped and skipped[-1]["loss"] is None and "loss" in skipped[-1]["nonfinite"]


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_busy_workdir_is_refused_at_once(workdir, corpus):
  before = snapshot(workdir)
  held = WorkdirLock(workdir)
  try:
    result = main_py(workdir, *run_args(corpus, "--config.training.num_steps=6"))
  finally:
    held.release()
  error_line(result, f"is in use by another training run (pid {os.getpid()} on ")
  assert "compiled the train step" not in result.stderr
  assert snapshot(workdir) == before


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_resume_that_changes_the_model_or_data_is_refused(workdir, corpus):
  before = snapshot(workdir)
  result = main_py(workdir, *run_args(corpus, "--config.model.width=64", "--config.seq_len=16",
                                      "--config.training.num_steps=6"))
  error_line(result, "cannot change on resume: model.width 32 -> 64, seq_len 32 -> 16; keep the "
             "saved values")
  assert snapshot(workdir) == before


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_eval_and_sample_read_the_saved_config(workdir):
  # No model overrides: the demo config says width 128, the run's config.json says 32.
  evaluated = main_py(workdir, "--mode=eval", "--config.eval.num_batches=1")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert "weights=ema" in evaluated.stdout
  before = snapshot(workdir)
  for mode in ("--mode=eval", "--mode=sample"):
    result = main_py(workdir, mode, "--config.model.width=64")
    error_line(result, "cannot change on eval or sample: model.width 32 -> 64")
  assert snapshot(workdir) == before


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_prompt_longer_than_the_context_is_refused(workdir):
  before = snapshot(workdir)
  result = main_py(workdir, "--mode=sample", "--prompt=" + "to be or not " * 3)
  error_line(result, "--prompt is 39 tokens long, not shorter than seq_len 32")
  assert snapshot(workdir) == before


@pytest.mark.parametrize("mode", ["train", "eval", "sample"])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_workdir_that_is_a_file_is_refused(tmp_path, corpus, mode):
  path = tmp_path / "file"
  path.write_text("not a workdir")
  result = main_py(str(path), f"--mode={mode}", *run_args(corpus) * (mode == "train"))
  error_line(result, f"--workdir {path} is a file, not a directory")
  assert path.read_text() == "not a workdir" and os.listdir(tmp_path) == ["file"]


@pytest.mark.parametrize("setup, message", [
    ("binary", "does not look like text"),
    ("held_out", "lower eval.batch_size or seq_len"),
])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_bad_training_input_writes_nothing(tmp_path, corpus, setup, message):
  extra = ["--config.eval.batch_size=4096"]
  if setup == "binary":
    shutil.copy("/bin/ls", tmp_path / "x.txt")
    extra = [f"--config.data.path={tmp_path / 'x.txt'}"]
  workdir = tmp_path / "run"
  error_line(main_py(str(workdir), *run_args(corpus), *extra), message)
  assert not workdir.exists()


@pytest.mark.parametrize("mode", ["eval", "sample"])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_eval_and_sample_on_an_empty_workdir_write_nothing(tmp_path, mode):
  (tmp_path / "empty").mkdir()
  for name in ("empty", "missing"):
    error_line(main_py(str(tmp_path / name), f"--mode={mode}"), "config.json not found")
  assert os.listdir(tmp_path) == ["empty"] and not os.listdir(tmp_path / "empty")


def test_tokens_per_s_counts_training_steps_only(trained):
  workdir, result = trained
  compile_s = float(re.search(r"compiled the train step in ([\d.]+) s", result.stderr)[1])
  train = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]
  tokens_per_window = 8 * 32 * 2  # batch_size x seq_len x log_every
  seconds = sum(tokens_per_window / r["tokens_per_s"] for r in train)
  # Four steps of a 1-layer, width-32 model take milliseconds; compiling takes seconds. With
  # compile (or eval) time counted, the windows would add up to more than the compile alone.
  assert len(train) == 2 and seconds < compile_s / 4, (seconds, compile_s)
  # step_s is the same clock per step (plot.py sums it into training minutes).
  assert sum(2 * r["step_s"] for r in train) == pytest.approx(seconds, rel=1e-4)


def start_two(workdir, args, logs) -> list[subprocess.Popen]:
  """Two main.py processes of one run on 127.0.0.1 (jax.distributed over gloo)."""
  address = f"127.0.0.1:{free_port()}"
  return [start(workdir, ["--config=configs/demo.py", *args], log,
                JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
          for i, log in enumerate(logs)]


def state_on_one_device(workdir, step):
  """The flat state of a checkpoint (saved by any number of processes) on this one device."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        ocp.StandardCheckpointer().metadata(path).item_metadata)
  return {k: np.asarray(v) for k, v in
          ocp.tree.to_flat_dict(ocp.StandardCheckpointer().restore(path, target)).items()}


@pytest.mark.slow
def test_two_processes_killed_and_resumed_match_an_uninterrupted_run(tmp_path, corpus):
  steps = 40
  args = [f"--config.data.path={corpus}", *TINY, f"--config.training.num_steps={steps}",
          "--config.training.log_every=10", "--config.training.checkpoint_every=10",
          "--config.training.eval_every=1000", "--config.sampling.every=0"]
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  logs = [str(tmp_path / f"{name}{i}.log") for name in ("straight", "killed", "resumed")
          for i in range(2)]
  wait_all(start_two(straight, args, logs[:2]), logs[:2])

  procs = start_two(killed, args, logs[2:4])
  first = os.path.join(killed, "checkpoints", "10")
  deadline = time.time() + 300
  while not os.path.exists(first) and time.time() < deadline and procs[0].poll() is None:
    time.sleep(0.01)
  for p in procs:
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
  done = sorted(int(s) for s in os.listdir(os.path.join(killed, "checkpoints")) if s.isdigit())
  assert 10 <= done[-1] < steps, done  # killed mid-way
  # One data-iterator state per process.
  assert sorted(os.listdir(os.path.join(first, "data"))) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  wait_all(start_two(killed, args, logs[4:]), logs[4:])  # the kill left no stale lock
  assert f"resumed from the checkpoint at step {done[-1]}" in open(logs[4]).read()

  a, b = state_on_one_device(straight, steps), state_on_one_device(killed, steps)
  assert a.keys() == b.keys() and len(a) > 50
  for k in a:
    np.testing.assert_array_equal(b[k], a[k], err_msg=str(k))
  records = strict_records(killed)
  keys = [(r["step"], r["split"], r.get("weights")) for r in records]
  assert len(keys) == len(set(keys)) and [r["step"] for r in records if r["split"] == "train"] == [
      10, 20, 30, 40]
