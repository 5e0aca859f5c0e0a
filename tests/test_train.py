"""The training system end to end through main.py: train -> eval -> sample, resume, bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from md4.data.corpora import clean_text8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [  # character level: configs/demo.py itself learns a BPE vocabulary
    "--config.data.tokenizer=char", "--config.vocab_size=27", "--config.seq_len=32",
    "--config.model.width=32", "--config.model.depth=1", "--config.model.num_heads=2",
    "--config.training.batch_size=8", "--config.eval.batch_size=8",
    "--config.eval.num_batches=2", "--config.sampling.num_samples=2",
    "--config.sampling.num_steps=8",
]


def main_py(workdir, *args, timeout=300, xla_flags=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("MD4_DEBUG", None)
  if xla_flags:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
  return subprocess.run([sys.executable, "main.py", "--config=configs/demo.py",
                         f"--workdir={workdir}", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env=env)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
  """A 40-step run with evaluations and checkpoints at steps 20 and 40: (workdir, its flags)."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  common = [f"--config.data.path={corpus}", *TINY]
  train = main_py(workdir, *common, "--config.training.num_steps=40",
                  "--config.training.log_every=10", "--config.training.eval_every=20",
                  "--config.training.checkpoint_every=20", "--config.sampling.every=40")
  assert train.returncode == 0, train.stderr[-3000:]
  return workdir, common


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_train_eval_sample(trained):
  workdir, common = trained
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  train_records = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train_records] == [10, 20, 30, 40]
  for r in train_records:
    assert {"loss", "bits_per_token", "ppl", "tokens_per_s", "lr", "grad_norm"} <= set(r)
    assert np.isclose(r["bits_per_token"], r["loss"] / np.log(2), rtol=1e-4)
  # Learning happened: below the uniform code length log2(27) = 4.75 bits.
  assert train_records[-1]["bits_per_token"] < train_records[0]["bits_per_token"]
  evals = [r for r in records if r["split"] == "eval"]
  assert {(r["step"], r["weights"]) for r in evals} == {(20, "params"), (20, "ema"),
                                                        (40, "params"), (40, "ema")}
  assert all(0 < r["bits_per_token"] < 6 and r["bits_per_token_se"] > 0 for r in evals)
  assert os.path.exists(os.path.join(workdir, "samples", "step_40.txt"))
  assert os.listdir(os.path.join(workdir, "tensorboard", "train"))
  assert json.load(open(os.path.join(workdir, "config.json")))["seq_len"] == 32
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "40"

  evaluated = main_py(workdir, *common, "--mode=eval")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert "bits_per_token=" in evaluated.stdout and "weights=ema" in evaluated.stdout
  eval_only = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
               if r["split"] == "eval_only"]
  ema_eval = [r for r in evals if r["step"] == 40 and r["weights"] == "ema"][0]
  assert eval_only[0]["bits_per_token"] == pytest.approx(ema_eval["bits_per_token"], rel=1e-5)

  sampled = main_py(workdir, *common, "--mode=sample", "--prompt=the king")
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  text = open(os.path.join(workdir, "samples", "final_step_40.txt")).read()
  lines = text.rstrip("\n").split("\n\n")
  assert len(lines) == 2 and all(s.startswith("the king") and len(s) == 32 for s in lines)
  # Another sampler from the command line: ReMDM, guided by the prompt (two passes per step).
  guided = main_py(workdir, *common, "--mode=sample", "--prompt=the king",
                   "--config.sampling.method=remdm", "--config.sampling.guidance=1.5",
                   "--config.sampling.num_steps=16")
  assert guided.returncode == 0, guided.stderr[-3000:]
  record = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if r["split"] == "sample_only"][-1]
  assert record["network_calls"] == 2 * 16
  unguided = main_py(workdir, *common, "--mode=sample", "--config.sampling.guidance=1.5")
  assert unguided.returncode == 2 and "give --prompt or --infill" in unguided.stderr


def final_params(workdir, step):
  state = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state"))
  return state


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_order_gap_reads_a_run(trained, capsys):
  from md4.tools import order_gap
  workdir, _ = trained
  assert order_gap.main([workdir, "--num_batches", "1"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("8 held-out sequences, ")  # eval.batch_size 8
  values = [float(re.search(r"([0-9.]+) bits/char", line).group(1)) for line in out[1:]]
  assert len(values) == 2 and all(0 < v < 10 for v in values), out
  assert order_gap.main([workdir, "--reference", workdir]) == 2
  assert capsys.readouterr().err.strip() == f"error: {workdir} is not an ar run"


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_learned_bpe_tokenizer_is_kept_with_the_run(tmp_path, corpus):
  workdir = str(tmp_path / "run")
  common = [f"--config.data.path={corpus}", *TINY, "--config.data.tokenizer=bpe",
            "--config.vocab_size=60"]
  train = main_py(workdir, *common, "--config.training.num_steps=20",
                  "--config.training.log_every=10", "--config.training.eval_every=20",
                  "--config.sampling.every=20")
  assert train.returncode == 0, train.stderr[-3000:]
  tokenizer = os.path.join(workdir, "tokenizer.json")
  merges = json.load(open(tokenizer))["model"]["merges"]
  assert len(merges) == 60 - 27
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  ratio = [r["bits_per_token"] / r["bits_per_char"] for r in records if r["split"] == "train"]
  # metrics.jsonl keeps 6 significant digits of each value.
  assert len(ratio) == 2 and ratio[0] == pytest.approx(ratio[1], rel=1e-5) and 1.2 < ratio[0] < 3
  evals = [r for r in records if r["split"] == "eval"]
  assert evals and all(1.2 < r["bits_per_token"] / r["bits_per_char"] < 3
                       and r["bits_per_char_se"] > 0 for r in evals)
  samples = open(os.path.join(workdir, "samples", "step_20.txt")).read().rstrip("\n").split("\n\n")
  assert len(samples) == 2 and all(len(s) > 32 for s in samples)  # 32 tokens, more characters

  # Eval and sample modes read the run's tokenizer, even on other text (zero-shot).
  other = tmp_path / "other.txt"
  other.write_text("to be or not to be that is the question " * 200)
  evaluated = main_py(workdir, *common, f"--config.data.path={other}", "--mode=eval")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert "bits_per_char=" in evaluated.stdout
  assert json.load(open(tokenizer))["model"]["merges"] == merges
  sampled = main_py(workdir, *common, "--mode=sample", "--prompt=the king")
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  text = open(os.path.join(workdir, "samples", "final_step_20.txt")).read()
  assert all(s.startswith("the king") for s in text.rstrip("\n").split("\n\n"))


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_byte_bpe_trains_on_raw_text_and_reports_bits_per_byte(tmp_path, corpus):
  workdir = str(tmp_path / "run")
  common = [f"--config.data.path={corpus}", *TINY, "--config.data.tokenizer=byte_bpe",
            "--config.vocab_size=300"]
  train = main_py(workdir, *common, "--config.training.num_steps=10",
                  "--config.training.log_every=10", "--config.training.eval_every=10",
                  "--config.sampling.every=0")
  assert train.returncode == 0, train.stderr[-3000:]
  assert len(json.load(open(os.path.join(workdir, "tokenizer.json")))["model"]["merges"]) == 44
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  evals = [r for r in records if r["split"] == "eval"]
  assert evals and all("bits_per_char" not in r and r["bits_per_byte_se"] > 0
                       and 1.2 < r["bits_per_token"] / r["bits_per_byte"] < 3 for r in evals)
  assert "bits_per_byte" in next(r for r in records if r["split"] == "train")
  sampled = main_py(workdir, *common, "--mode=sample", "--prompt=KING. Speak,")
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  text = open(os.path.join(workdir, "samples", "final_step_10.txt")).read()
  assert all(s.startswith("KING. Speak,") for s in text.rstrip("\n").split("\n\n"))


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_ggm_unigram_noise_and_nelbo(tmp_path, corpus):
  """GGM with the paper's choices (K = 4, unigram noise): the noise law is counted once from the
  training split and saved; eval lines, --mode=eval and sampling read it; eval reports bits."""
  workdir = str(tmp_path / "run")
  common = [f"--config.data.path={corpus}", *TINY]
  run = lambda *args: subprocess.run(
      [sys.executable, "main.py", "--config=configs/ggm_paper_demo.py", f"--workdir={workdir}",
       *common, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  train = run("--config.training.num_steps=10", "--config.training.log_every=10",
              "--config.training.eval_every=10", "--config.sampling.every=10",
              "--config.eval.weights=('ema',)")
  assert train.returncode == 0, train.stderr[-3000:]
  law = np.load(os.path.join(workdir, "noise.npy"))
  text = open(corpus).read()
  train_text = clean_text8(text[:int(0.9 * len(text))])  # the held-out tenth comes last
  freq = np.array([train_text.count(c) for c in "abcdefghijklmnopqrstuvwxyz "]) / len(train_text)
  assert law.shape == (27,) and abs(law.sum() - 1) < 1e-9 and np.all(law > 0)
  np.testing.assert_allclose(law, freq, atol=5e-3)
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  (train_line,) = [r for r in records if r["split"] == "train"]
  assert "bits_per_token" not in train_line
  (eval_line,) = [r for r in records if r["split"] == "eval"]
  # Untrained (logits ~ 0, the model is about u^L): near the unigram entropy, 4.1 bits per
  # character, but one step per sequence makes 16 sequences' mean noisy (se ~ 1.5 bits).
  assert 0 < eval_line["bits_per_char"] < 12 and eval_line["bits_per_char_se"] > 0
  assert eval_line["bits_per_char"] == pytest.approx(eval_line["bits_per_token"])
  assert 0 < eval_line["classifier_loss"] < 1
  (sample_line,) = [r for r in records if r["split"] == "sample"]
  assert sample_line["network_calls"] == 4 * 32
  before = os.path.getmtime(os.path.join(workdir, "noise.npy"))
  evaluated = run("--mode=eval")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert "bits_per_char=" in evaluated.stdout
  sampled = run("--mode=sample")
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  assert os.path.getmtime(os.path.join(workdir, "noise.npy")) == before


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path, corpus):
  steps = ["--config.training.num_steps=300", "--config.training.checkpoint_every=25",
           "--config.training.log_every=25", "--config.training.eval_every=1000",
           f"--config.data.path={corpus}", *TINY]
  straight = str(tmp_path / "straight")
  assert main_py(straight, *steps).returncode == 0

  killed = str(tmp_path / "killed")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, "main.py", "--config=configs/demo.py",
                           f"--workdir={killed}", *steps], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = os.path.join(killed, "checkpoints", "50")
  deadline = time.time() + 240
  while not os.path.exists(first) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.01)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  done = sorted(int(s) for s in os.listdir(os.path.join(killed, "checkpoints")) if s.isdigit())
  assert 50 <= done[-1] < 300, done  # killed mid-way
  resumed = main_py(killed, *steps)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from the checkpoint" in resumed.stderr

  a, b = final_params(straight, 300), final_params(killed, 300)
  flat_a, flat_b = ocp.tree.to_flat_dict(a), ocp.tree.to_flat_dict(b)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=str(k))


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_many_steps_between_host_syncs_on_two_cpu_devices(tmp_path, corpus):
  # 300 steps dispatched without a host sync used to starve XLA:CPU's in-process all-reduce
  # (the run aborted after its 40 s rendezvous timeout); the loop now keeps 2 steps in flight.
  workdir = str(tmp_path / "run")
  result = main_py(workdir, f"--config.data.path={corpus}", *TINY,
                   "--config.training.num_steps=300", "--config.training.log_every=300",
                   "--config.training.eval_every=1000", "--config.training.checkpoint_every=1000",
                   "--config.sampling.every=0", "--config.training.batch_size=16",
                   xla_flags="--xla_force_host_platform_device_count=2", timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "rendezvous" not in result.stderr
  [train] = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
             if r["split"] == "train"]
  assert train["step"] == 300 and train["bits_per_token"] < 4.5


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_corrupt_latest_checkpoint_falls_back(tmp_path, trained):
  source, common = trained
  workdir = str(tmp_path / "run")  # a copy: the other tests read the trained run
  shutil.copytree(source, workdir)
  # Corrupt every file of the newest checkpoint's state.
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "40", "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  resumed = main_py(workdir, *common, "--mode=eval")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "step 40" in resumed.stderr and "corrupt" in resumed.stderr
  evaluated = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
               if r["split"] == "eval_only"]
  assert evaluated[-1]["step"] == 20  # the previous checkpoint


# One case per stage that can reject input: config validation, the data (dataset, path,
# tokenizer file) and the vocabulary check against it. The other validation messages are
# checked in-process (test_config_lib.py); main.py reports every ConfigError alike.
@pytest.mark.parametrize("override, message", [
    ("--config.model_type=nope", "unknown model_type 'nope'"),
    ("--config.vocab_size=30", "vocab_size 30 does not match"),
    ("--config.data.dataset=nope", "nope"),
    ("--config.data.path=/nonexistent/corpus", "/nonexistent/corpus"),
    ("--config.data.tokenizer=bpe --config.vocab_size=60 --config.data.tokenizer_path=README.md",
     "README.md is not a BPE tokenizer file over the text8 alphabet"),
])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_bad_input_is_one_clear_line(tmp_path, corpus, override, message):
  args = [f"--config.data.path={corpus}", *TINY, *override.split()]
  result = main_py(str(tmp_path / "run"), *args)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, last
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--config.training.nope=1"], "'nope'"),
    (["--config.training.num_steps=abc"], "abc"),
    (["--config=configs/nope.py"], "configs/nope.py"),
])
def test_bad_flags_are_one_clear_line(tmp_path, args, message):
  result = main_py(str(tmp_path / "run"), *args)
  assert result.returncode == 2
  assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_nonfinite_loss_stops_before_checkpoint(tmp_path, corpus):
  workdir = str(tmp_path / "run")
  checkpoints = os.path.join(workdir, "checkpoints")
  assert not os.path.exists(checkpoints)  # before: nothing
  result = main_py(workdir, f"--config.data.path={corpus}", *TINY, "--config.optimizer.lr=1e30",
                   "--config.optimizer.grad_clip=0", "--config.training.num_steps=30",
                   "--config.training.log_every=5", "--config.training.checkpoint_every=5")
  assert result.returncode == 2
  line = result.stderr.strip().splitlines()[-1]
  match = re.search(r"(\d+) non-finite updates in a row up to step (\d+)", line)
  assert match, line
  first_bad = int(match[2]) - int(match[1]) + 1
  # After: no checkpoint (nor a partial one) from the first update of the streak on.
  saved = sorted(os.listdir(checkpoints)) if os.path.isdir(checkpoints) else []
  assert all(name.isdigit() and int(name) < first_bad for name in saved), (saved, line)
  steps = sorted(int(name) for name in saved)
  assert (f"Last checkpoint: step {steps[-1]} " in line if steps
          else "No checkpoint was saved" in line), (steps, line)


@pytest.mark.parametrize("config, expected", [
    ("configs/genmd4_demo.py", {"surrogate", "w_min", "w_mean", "w_max", "bits_per_token"}),
    ("configs/ggm_demo.py", {"loss"}),  # the classifiers' loss; eval has the NELBO
    ("configs/ar_demo.py", {"bits_per_token", "ppl"}),
    # UNet compilation makes the image runs slow on a CPU.
    pytest.param("configs/blackout_demo.py", {"loss"}, marks=pytest.mark.slow),
    pytest.param("configs/md4_pixels_demo.py", {"bits_per_dim", "bits_per_token"},
                 marks=pytest.mark.slow),
])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_other_methods_train_eval_sample(tmp_path, corpus, config, expected):
  workdir = str(tmp_path / "run")
  is_image = "blackout" in config or "pixels" in config
  data = (["--config.unet.base_channels=8", "--config.blackout.num_steps=20",
           "--config.sampling.num_steps=8", "--config.sampling.num_samples=2",
           "--config.eval.num_batches=1", "--config.training.batch_size=8"] if is_image
          else [f"--config.data.path={corpus}", *TINY])
  args = [f"--config={config}", *data,
          "--config.training.num_steps=10", "--config.training.log_every=5",
          "--config.training.eval_every=10", "--config.sampling.every=10",
          "--config.eval.weights=('ema',)"]
  result = subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  train = [r for r in records if r["split"] == "train"]
  assert expected <= set(train[-1]) and np.isfinite(train[-1]["loss"])
  evals = [r for r in records if r["split"] == "eval"]
  assert len(evals) == 1 and evals[0]["weights"] == "ema"
  if "ggm" in config or "blackout" in config:
    assert "bits_per_token" not in train[-1]  # a classification / score loss
  if "blackout" in config:
    assert "bits_per_token" not in evals[0]  # no likelihood bound
  else:
    assert 0 < evals[0]["bits_per_token"] < (9 if is_image else 6)
  if is_image:
    with open(os.path.join(workdir, "samples", "step_10.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return
  samples = open(os.path.join(workdir, "samples", "step_10.txt")).read().rstrip("\n").split("\n\n")
  assert len(samples) == 2 and all(len(s) == 32 for s in samples)
