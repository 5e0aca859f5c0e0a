"""Evaluation: the held-out NELBO against an exact oracle, generative perplexity against the
reference model's own held-out perplexity, zero-shot likelihood and the reference-model wiring."""

import json
import math
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ar_demo, demo
from md4 import config_lib, methods
from md4.data import tokenizers
from md4.diffusion import masked
from md4.diffusion.schedules import get_schedule
from md4.evaluation import evaluate, inference
from md4.evaluation.reference import check_reference_tokenizer, load_reference
from md4.training import sharding, train
from md4.training.run import TOKENIZER_FILE, load_for_inference
from tests import oracle
from tests.test_infill import perturbed_params

V, L = 3, 3
P = oracle.random_distribution(0, V, L)
LOGITS_FN = oracle.masked_oracle(P)
MESH = sharding.make_mesh(-1, 1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@jax.jit
def oracle_eval_step(params, batch, rng):
  del params
  return {"nelbo": masked.nelbo(LOGITS_FN, batch["tokens"], rng, get_schedule("linear"),
                                vocab_size=V)}


@pytest.mark.parametrize("index", [int(np.argmax(P)), int(np.argsort(P.reshape(-1))[5])])
def test_held_out_nelbo_matches_oracle_and_its_standard_error_shrinks(index):
  x = np.array(np.unravel_index(index, P.shape), np.int32)
  batches = [{"tokens": np.tile(x, (64, 1))}] * 16  # 1024 copies: all spread is Monte Carlo noise
  reports = {k: evaluate.held_out(oracle_eval_step, None, batches, MESH, rng=jax.random.key(0),
                                  num_batches=0, likelihood_metrics=("nelbo",), time_samples=k)
             for k in (1, 4, 16)}
  se = {k: r["bits_per_token_se"] for k, r in reports.items()}
  assert se[1] > se[4] > se[16] > 0, se
  # Independent draws: sqrt(16) = 4. The NELBO's weight 1/t near t = 0 gives it a heavy tail, so
  # the standard error is itself a noisy estimate (2.5 to 4.3 over four seeds): a wide band.
  assert 2.0 < se[1] / se[16] < 6.0, se
  target = -math.log(P.reshape(-1)[index])  # nats per sequence
  for k, r in reports.items():
    assert r["time_samples"] == k and r["eval_examples"] == 1024
    nats, nats_se = r["loss"] * L, se[k] * math.log(2) * L
    assert abs(nats - target) < 4 * nats_se + 1e-2, (k, nats, nats_se, target)
  again = evaluate.held_out(oracle_eval_step, None, batches, MESH, rng=jax.random.key(0),
                            num_batches=0, likelihood_metrics=("nelbo",), time_samples=4)
  assert again == reports[4]  # fixed keys


def test_bits_per_char_are_total_bits_over_total_characters():
  # Examples of 3 tokens whose tokens stand for 1-3 characters (as BPE pieces do).
  lengths = jnp.array([1, 2, 3])
  rng = np.random.default_rng(0)
  batches = [{"tokens": rng.integers(0, V, (64, L)).astype(np.int32)} for _ in range(4)]

  @jax.jit
  def step(params, batch, rng):
    out = oracle_eval_step(params, batch, rng)
    return {**out, evaluate.UNITS: lengths[batch["tokens"]].sum(-1)}

  kw = dict(mesh=MESH, rng=jax.random.key(0), num_batches=0, likelihood_metrics=("nelbo",))
  report = evaluate.held_out(step, None, batches, **kw)
  nats = np.concatenate([np.asarray(oracle_eval_step(None, b, jax.random.fold_in(
      jax.random.fold_in(kw["rng"], i), 0))["nelbo"]) for i, b in enumerate(batches)])
  chars = np.concatenate([np.asarray(lengths)[b["tokens"]].sum(-1) for b in batches])
  assert report["bits_per_char"] == pytest.approx(nats.sum() / chars.sum() / math.log(2), 1e-5)
  assert report["bits_per_token"] == pytest.approx(nats.mean() / L / math.log(2), 1e-5)
  assert report["bits_per_char"] != pytest.approx(report["bits_per_token"], 1e-2)
  assert "chars" not in report
  # One character per token: the same numbers and standard errors as per token.
  per_char = evaluate.bits_per_unit(nats, np.full(len(nats), L))
  assert per_char["bits_per_char"] == pytest.approx(report["bits_per_token"], 1e-5)
  assert per_char["bits_per_char_se"] == pytest.approx(report["bits_per_token_se"], 1e-5)
  # The ratio's standard error against the spread of bootstrap resamples of the examples.
  boot = [nats[i].sum() / chars[i].sum() / math.log(2)
          for i in rng.integers(0, len(nats), (2000, len(nats)))]
  assert report["bits_per_char_se"] == pytest.approx(np.std(boot), rel=0.1)


def tiny_ar(seed=0):
  config = config_lib.base()
  config.model_type = "ar"
  config.seq_len = 32
  config.model.update(width=32, depth=1, num_heads=2, time_conditioning=False)
  method = methods.create(config, 27)
  return method, perturbed_params(method, seed=seed)


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_generative_perplexity_of_own_samples_matches_held_out_perplexity():
  method, params = tiny_ar()
  draw = jax.jit(method.sample, static_argnums=2)
  held_out_data, generated = (np.asarray(draw(params, jax.random.key(k), 512)) for k in (1, 2))
  eval_step = jax.jit(lambda p, batch, rng: method.evaluate(p, batch["tokens"], rng))
  batches = [{"tokens": held_out_data[i:i + 128]} for i in range(0, 512, 128)]
  report = evaluate.held_out(eval_step, params, batches, MESH, rng=jax.random.key(0),
                             num_batches=0, likelihood_metrics=("nll",))
  nll_fn = jax.jit(lambda tokens: method.nll(params, tokens))
  gen = evaluate.generative_perplexity(generated, nll_fn)
  # Both estimate exp(entropy per token) of the model: they agree within 4 standard errors
  # (and within 5%); the model is far from uniform (ppl 27), so the comparison has teeth.
  held_se = report["bits_per_token_se"] * math.log(2)
  assert abs(gen["gen_nats_per_token"] - report["loss"]) < 4 * math.hypot(
      held_se, gen["gen_nats_per_token_se"]), (gen, report)
  assert abs(gen["gen_ppl"] / report["ppl"] - 1) < 0.05, (gen, report)
  assert gen["gen_ppl"] < 10
  assert gen["gen_ppl"] == pytest.approx(math.exp(gen["gen_nats_per_token"]))
  # Uniform tokens score at least log V per token under any model (Jensen), far worse here.
  uniform = np.asarray(jax.random.randint(jax.random.key(3), (512, 32), 0, 27))
  worse = evaluate.generative_perplexity(uniform, nll_fn)
  assert worse["gen_nats_per_token"] > math.log(27)
  assert worse["gen_nats_per_token"] > gen["gen_nats_per_token"] + 10 * math.hypot(
      worse["gen_nats_per_token_se"], gen["gen_nats_per_token_se"])
  # So do the samples of another random model (6.2 against 0.98 nats per token here).
  theirs = np.asarray(draw(tiny_ar(seed=7)[1], jax.random.key(1), 512))
  assert evaluate.generative_perplexity(theirs, nll_fn)["gen_ppl"] > 10 * gen["gen_ppl"]


def test_generative_perplexity_takes_any_nll_fn():
  samples = np.zeros((4, 8), np.int32)
  report = evaluate.generative_perplexity(samples, lambda tokens: np.full(len(tokens), 8.0))
  assert report == {"gen_ppl": pytest.approx(math.e), "gen_nats_per_token": 1.0,
                    "gen_nats_per_token_se": 0.0}
  with pytest.raises(ValueError, match="B >= 2"):
    evaluate.generative_perplexity(samples[:1], jnp.sum)


def tiny(config, corpus, workdir, steps):
  config.data.update(path=corpus, tokenizer="char")
  config.vocab_size, config.seq_len = 27, 32
  config.model.update(width=32, depth=1, num_heads=2)
  config.training.update(batch_size=8, num_steps=steps, log_every=steps, eval_every=steps,
                         checkpoint_every=steps)
  config.eval.update(batch_size=8, num_batches=1, weights=("ema",))
  config.sampling.update(every=steps, num_samples=4, num_steps=8)
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
  """A tiny AR reference and a tiny MD4 scored by it (trained in this process)."""
  root = tmp_path_factory.mktemp("runs")
  ar_dir, md4_dir = str(root / "ar"), str(root / "md4")
  reference = tiny(ar_demo.get_config(), corpus, ar_dir, 20)
  reference.sampling.every = 0
  train.train(reference, ar_dir)
  config = tiny(demo.get_config(), corpus, md4_dir, 10)
  config.eval.reference_workdir = ar_dir
  train.train(config, md4_dir)
  return ar_dir, md4_dir, config


def records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_samples_report_generative_perplexity_under_the_reference(runs):
  ar_dir, md4_dir, config = runs
  sample = records(md4_dir, "sample")[-1]
  assert 1 < sample["gen_ppl"] < 60 and sample["gen_nats_per_token_se"] > 0
  # The reference is restored with its own saved config, whatever this run's model is.
  nll_fn = load_reference(config)
  tokens = np.zeros((2, 32), np.int32)
  run, state, _ = load_for_inference(config_lib.load(ar_dir), ar_dir, with_data=False)
  assert run.data is None
  np.testing.assert_allclose(nll_fn(tokens), run.method.nll(state["ema"], tokens), rtol=1e-6)


@pytest.mark.parametrize("change, message", [
    (dict(seq_len=64), "its seq_len 32 is shorter than this run's 64"),
    (dict(reference="md4"), "holds a 'md4' run"),
    (dict(reference="nowhere"), "config.json not found"),
])
def test_reference_is_checked_up_front(runs, tmp_path, change, message):
  ar_dir, md4_dir, config = runs
  config = config_lib.load(md4_dir)
  config.seq_len = change.get("seq_len", 32)
  config.eval.reference_workdir = {"md4": md4_dir, "nowhere": str(tmp_path)}.get(
      change.get("reference"), ar_dir)
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    load_reference(config)


def test_a_bpe_reference_must_share_the_runs_merges(tmp_path):
  saved = config_lib.base()  # (not `reference`: that is the module under test)
  saved.model_type, saved.data.tokenizer = "ar", "bpe"
  config_lib.save(saved, str(tmp_path))
  config = config_lib.base()
  config.eval.reference_workdir = str(tmp_path)
  text = "to be or not to be that is the question " * 20
  ours, other = (tokenizers.BPETokenizer.learn(text, n) for n in (40, 41))
  with pytest.raises(config_lib.ConfigError, match="its BPE tokenizer .* is not this run's"):
    check_reference_tokenizer(config, ours)  # no tokenizer.json there
  ours.save(str(tmp_path / TOKENIZER_FILE))
  check_reference_tokenizer(config, ours)
  with pytest.raises(config_lib.ConfigError, match="is not this run's"):
    check_reference_tokenizer(config, other)
  check_reference_tokenizer(config, tokenizers.CharTokenizer())  # nothing learned


def test_zero_shot_eval_on_other_data(runs, tmp_path):
  _, md4_dir, config = runs
  in_domain = inference.eval_only(config, md4_dir)
  other = tmp_path / "macbeth.txt"
  with open(os.path.join(os.path.dirname(__file__), "..", "data", "shakespeare",
                         "macbeth.txt")) as f:
    other.write_text(f.read()[:30_000])
  zero_shot_config = config_lib.load(md4_dir)
  zero_shot_config.data.path = str(other)
  zero_shot = inference.eval_only(zero_shot_config, md4_dir)
  assert str(other) in zero_shot["data"] and config.data.path in in_domain["data"]
  assert zero_shot["bits_per_token"] != in_domain["bits_per_token"]
  assert 0 < zero_shot["bits_per_token"] < 6 and zero_shot["bits_per_token_se"] > 0
  lines = records(md4_dir, "eval_only")
  assert [r["data"] for r in lines[-2:]] == [in_domain["data"], zero_shot["data"]]


def main_py(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("MD4_DEBUG", None)
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=env)


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_infill_from_the_command_line_keeps_known_text(runs):
  ar_dir, md4_dir, config = runs
  template = "the ____ of ___ is"
  result = main_py("--config=configs/demo.py", f"--workdir={md4_dir}", "--mode=sample",
                   f"--infill={template}", *(f"--config.{k}={v}" for k, v in (
                       ("data.path", config.data.path), ("data.tokenizer", "char"),
                       ("vocab_size", 27), ("seq_len", 32), ("model.width", 32),
                       ("model.depth", 1), ("model.num_heads", 2), ("sampling.num_samples", 4),
                       ("sampling.num_steps", 8), ("eval.reference_workdir", ar_dir))))
  assert result.returncode == 0, result.stderr[-3000:]
  samples = result.stdout.strip("\n").split("\n\n")
  assert len(samples) == 4
  for sample in samples:
    assert len(sample) == 32 and "_" not in sample
    assert all(c == "_" or c == s for c, s in zip(template, sample, strict=False)), sample
  line = records(md4_dir, "sample_only")[-1]
  assert line["conditioning"] == "infill" and line["gen_ppl"] > 1
  assert os.path.exists(os.path.join(md4_dir, "samples", "infill_step_10.txt"))


@pytest.mark.parametrize("config, args, message", [
    ("demo", ["--prompt=to be", "--infill=to __"], "--prompt and --infill cannot be combined"),
    ("demo", ["--infill_region=center"], "--infill_region is for image models"),
    ("md4_pixels_demo", ["--infill=ab_"], "--infill is for text models"),
    ("blackout_demo", ["--infill_region=center"], "Blackout sampling has no conditioning"),
])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_bad_conditioning_is_one_clear_line(tmp_path, config, args, message):
  result = main_py(f"--config=configs/{config}.py", f"--workdir={tmp_path}", "--mode=sample",
                   *args)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, last
  assert "Traceback" not in result.stderr


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_conditioning_flags_need_sample_mode(tmp_path):
  result = main_py("--config=configs/demo.py", f"--workdir={tmp_path}", "--mode=eval",
                   "--infill=to __")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --prompt, --infill, --infill_region and --class_label are for --mode=sample")


@pytest.mark.slow  # UNet compilation
def test_image_infill_from_the_command_line(tmp_path):
  workdir = str(tmp_path / "pixels")
  tiny_unet = ["--config=configs/md4_pixels_demo.py", f"--workdir={workdir}",
               "--config.unet.base_channels=8", "--config.sampling.num_steps=4",
               "--config.sampling.num_samples=4", "--config.eval.num_batches=1",
               "--config.training.batch_size=8", "--config.training.num_steps=4",
               "--config.sampling.every=0", "--config.eval.weights=('ema',)"]
  trained = main_py(*tiny_unet)
  assert trained.returncode == 0, trained.stderr[-3000:]
  result = main_py(*tiny_unet, "--mode=sample", "--infill_region=0:14,:")
  assert result.returncode == 0, result.stderr[-3000:]
  path = os.path.join(workdir, "samples", "infill_step_4.png")
  assert result.stdout.strip() == f"wrote {path}"
  with open(path, "rb") as f:
    png = f.read()
  width, height = struct.unpack(">II", png[16:24])
  # A 2 x 2 grid of (masked input | completion) pairs, each 28 x 57, with 2-pixel padding.
  assert (width, height) == (2 * 57 + 3 * 2, 2 * 28 + 3 * 2)
  assert records(workdir, "sample_only")[-1]["conditioning"] == "region"
