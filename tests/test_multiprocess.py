"""A real two-process run (two main.py processes on 127.0.0.1, gloo CPU collectives) against one
process training on the same global batches."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
ARGS = [
    "--config=configs/demo.py", "--config.seq_len=32", "--config.model.width=32",
    "--config.model.depth=1", "--config.model.num_heads=2", "--config.training.batch_size=8",
    f"--config.training.num_steps={STEPS}", "--config.training.log_every=2",
    f"--config.training.checkpoint_every={STEPS}", "--config.training.eval_every=1000",
    "--config.eval.batch_size=8", "--config.eval.num_batches=2", "--config.eval.weights=('ema',)",
    f"--config.sampling.every={STEPS}", "--config.sampling.num_samples=2",
    "--config.sampling.num_steps=4",
]
TIMEOUT = 400


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir: str, args: list[str], log: str, **env_extra) -> subprocess.Popen:
  """`main.py --workdir=WORKDIR *args` on the CPU, its output in `log`; env_extra are set."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **env_extra}
  for v in ("MD4_DEBUG", "XLA_FLAGS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    env.pop(v, None)
  with open(log, "w") as out:
    return subprocess.Popen([sys.executable, "main.py", f"--workdir={workdir}", *args],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], logs: list[str]) -> None:
  """Waits for every process (killing all of them after TIMEOUT s); each must exit with 0."""
  deadline = time.time() + TIMEOUT
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.time()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, f"{log}: rc={p.returncode}\n" + open(log).read()[-3000:]


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def final_state(workdir, like=None):
  """The last checkpoint's state on this process's one device (restored into `like`'s tree)."""
  path = os.path.join(workdir, "checkpoints", str(STEPS), "state")
  target = None if like is None else jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      like)
  return ocp.StandardCheckpointer().restore(path, target)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, corpus):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  logs = [str(tmp_path / name) for name in ("single.log", "p0.log", "p1.log")]

  address = f"127.0.0.1:{free_port()}"
  args = [*ARGS, f"--config.data.path={corpus}"]
  procs = [start(single, args, logs[0])] + [
      start(multi, args, logs[1 + i], JAX_COORDINATOR_ADDRESS=address,
            JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)) for i in range(2)]
  wait_all(procs, logs)
  assert "process 1 of 2, 1 local / 2 global devices" in open(logs[2]).read()

  # Process 0 alone writes the metrics (no duplicated records), samples and the config.
  one, two = read_jsonl(os.path.join(single, "metrics.jsonl")), read_jsonl(
      os.path.join(multi, "metrics.jsonl"))
  assert [(r["step"], r["split"]) for r in two] == [(r["step"], r["split"]) for r in one]
  train_one = [r for r in one if r["split"] == "train"]
  train_two = [r for r in two if r["split"] == "train"]
  assert [r["step"] for r in train_two] == [2, 4, 6]
  for a, b in zip(train_one, train_two, strict=True):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
  eval_one, eval_two = [[r for r in rs if r["split"] == "eval"] for rs in (one, two)]
  np.testing.assert_allclose(eval_two[0]["loss"], eval_one[0]["loss"], rtol=1e-5)
  assert os.listdir(os.path.join(multi, "samples")) == [f"step_{STEPS}.txt"]

  # One checkpoint, written once; the same parameters, moments and EMA as the single process.
  assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == [str(STEPS)]
  # The two-process checkpoint (saved over 2 devices) restores onto one device.
  single_state = final_state(single)
  a = ocp.tree.to_flat_dict(single_state)
  b = ocp.tree.to_flat_dict(final_state(multi, like=single_state))
  assert a.keys() == b.keys() and len(a) > 50
  for k in a:
    np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=1e-5, atol=1e-6,
                               err_msg=str(k))
