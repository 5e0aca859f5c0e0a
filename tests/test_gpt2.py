"""GPT-2 from a Hugging Face checkpoint: logits against an independent numpy forward pass of the
same weights, and generative perplexity under it, end to end through main.py --mode=sample."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import demo
from md4 import config_lib
from md4.data import tokenizers
from md4.evaluation import reference
from md4.networks import gpt2
from md4.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_gpt2_ranks = pytest.mark.skipif(not tokenizers.DEFAULT_GPT2_RANKS.is_file(),
                                      reason="data/gpt2.tiktoken absent: run `make data`")
EOT = 50256


def write_checkpoint(path, *, vocab=50257, positions=8, width=16, layers=2, heads=2, seed=0,
                     prefix="") -> dict:
  """A random GPT-2 in Hugging Face's layout (Conv1D weights [in, out]); returns the weights."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, scale=0.3: (scale * rng.standard_normal(shape)).astype(np.float32)
  w = {"wte.weight": normal(vocab, width), "wpe.weight": normal(positions, width),
       "ln_f.weight": 1 + normal(width, scale=0.1), "ln_f.bias": normal(width, scale=0.1)}
  for i in range(layers):
    for name, shape in (("ln_1.weight", (width,)), ("ln_1.bias", (width,)),
                        ("attn.c_attn.weight", (width, 3 * width)),
                        ("attn.c_attn.bias", (3 * width,)),
                        ("attn.c_proj.weight", (width, width)), ("attn.c_proj.bias", (width,)),
                        ("ln_2.weight", (width,)), ("ln_2.bias", (width,)),
                        ("mlp.c_fc.weight", (width, 4 * width)), ("mlp.c_fc.bias", (4 * width,)),
                        ("mlp.c_proj.weight", (4 * width, width)), ("mlp.c_proj.bias", (width,))):
      w[f"h.{i}.{name}"] = normal(*shape) + (1 if name.endswith("ln_1.weight")
                                             or name.endswith("ln_2.weight") else 0)
    # The causal-mask buffer older checkpoints carry: not a parameter.
    w[f"h.{i}.attn.bias"] = np.tril(np.ones((positions, positions), np.float32))[None, None]
  os.makedirs(path, exist_ok=True)
  save_file({prefix + k: v for k, v in w.items()}, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab,
               "n_positions": positions, "n_ctx": positions, "n_embd": width, "n_layer": layers,
               "n_head": heads, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}, f)
  return {k: v.astype(np.float64) for k, v in w.items()}


def numpy_logits(w: dict, tokens: np.ndarray, layers: int, heads: int) -> np.ndarray:
  """GPT-2's forward pass written out in float64 numpy, for one sequence int[L]."""
  def norm(x, name):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w[name + ".weight"] + w[name + ".bias"]

  def gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

  length = len(tokens)
  x = w["wte.weight"][tokens] + w["wpe.weight"][:length]
  width = x.shape[1]
  d = width // heads
  for i in range(layers):
    p = f"h.{i}."
    qkv = norm(x, p + "ln_1") @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
    q, k, v = qkv[:, :width], qkv[:, width:2 * width], qkv[:, 2 * width:]
    out = np.zeros((length, width))
    for h in range(heads):
      s = slice(h * d, (h + 1) * d)
      scores = q[:, s] @ k[:, s].T / math.sqrt(d)
      scores[np.triu_indices(length, 1)] = -np.inf  # position t sees positions <= t
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      out[:, s] = probs / probs.sum(-1, keepdims=True) @ v[:, s]
    x = x + out @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
    hidden = gelu(norm(x, p + "ln_2") @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
    x = x + hidden @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
  return norm(x, "ln_f") @ w["wte.weight"].T


def numpy_nats(w: dict, ids: list, window: int) -> tuple[float, int]:
  """Total nats of GPT-2 ids (windows of `window`, each after <|endoftext|>) and their count."""
  total = 0.0
  for start in range(0, len(ids), window):
    seq = [EOT] + ids[start:start + window]
    logits = numpy_logits(w, np.array(seq[:-1]), 2, 2)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
    total -= log_probs[np.arange(len(seq) - 1), seq[1:]].sum()
  return total, len(ids)


@pytest.mark.parametrize("prefix", ["", "transformer."])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_logits_match_a_numpy_forward_pass(tmp_path, prefix):
  w = write_checkpoint(str(tmp_path), vocab=97, layers=2, heads=2, prefix=prefix)
  model, params = gpt2.load_gpt2(str(tmp_path))
  assert (model.hparams.n_layer, model.hparams.n_head, model.hparams.n_positions) == (2, 2, 8)
  tokens = np.random.default_rng(1).integers(0, 97, (3, 8)).astype(np.int32)
  logits = np.asarray(model.apply({"params": params}, tokens))
  assert logits.shape == (3, 8, 97) and logits.std() > 0.5
  for row, seq in zip(logits, tokens, strict=True):
    np.testing.assert_allclose(row, numpy_logits(w, seq, 2, 2), rtol=1e-4, atol=1e-4)
  # A prefix of the input gives the same logits (causal), shorter inputs are accepted.
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, tokens[:, :5])),
                             logits[:, :5], rtol=1e-5, atol=1e-5)


def test_bad_checkpoints_are_one_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json, .*model.safetensors not found"):
    gpt2.load_gpt2(str(tmp_path))
  write_checkpoint(str(tmp_path), vocab=97)
  config = json.load(open(tmp_path / "config.json"))
  json.dump({**config, "n_embd": 32}, open(tmp_path / "config.json", "w"))
  with pytest.raises(ValueError, match="the GPT-2 weights do not match config.json"):
    gpt2.load_gpt2(str(tmp_path))
  json.dump({**config, "model_type": "llama"}, open(tmp_path / "config.json", "w"))
  with pytest.raises(ValueError, match="is a 'llama' config, not a GPT-2 one"):
    gpt2.load_gpt2(str(tmp_path))


@needs_gpt2_ranks
def test_gpt2_nll_scores_retokenized_text_per_gpt2_token(tmp_path):
  w = write_checkpoint(str(tmp_path))
  chars = tokenizers.CharTokenizer()
  texts = ["the king is dead long live the king", "to be or not to be", "a" * 36]
  samples = np.stack([chars.encode(t.ljust(36)) for t in texts])
  samples[1, -1] = 27  # a mask id: decoded as "_", scored as text
  nll_fn = reference.gpt2_nll(str(tmp_path), chars, batch_size=2)
  got = nll_fn(samples) / samples.shape[1]
  gpt2_ids = tokenizers.GPT2Tokenizer().encode_batch([chars.decode(s) for s in samples])
  assert max(len(ids) for ids in gpt2_ids) > 7  # more than one window of n_positions - 1
  want = [total / count for total, count in (numpy_nats(w, ids.tolist(), 7) for ids in gpt2_ids)]
  np.testing.assert_allclose(got, want, rtol=1e-4)


def main_py(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=env)


@pytest.mark.slow  # trains a tiny run and starts main.py three times: about a minute on 2 cores
@needs_gpt2_ranks
def test_gen_ppl_under_gpt2_through_main_sample(tmp_path, corpus):
  checkpoint, workdir = str(tmp_path / "gpt2"), str(tmp_path / "run")
  w = write_checkpoint(checkpoint, positions=64)
  flags = {"data.path": corpus, "data.tokenizer": "char", "vocab_size": 27, "seq_len": 32,
           "model.width": 32, "model.depth": 1, "model.num_heads": 2, "training.batch_size": 8,
           "training.num_steps": 2, "training.checkpoint_every": 2, "training.eval_every": 2,
           "eval.batch_size": 8, "eval.num_batches": 1, "sampling.num_samples": 3,
           "sampling.num_steps": 4}
  config = demo.get_config()
  for key, value in flags.items():
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
  train.train(config, workdir)
  args = ["--config=configs/demo.py", f"--workdir={workdir}", "--mode=sample",
          *(f"--config.{k}={v}" for k, v in flags.items())]
  result = main_py(*args, f"--config.eval.reference=gpt2:{checkpoint}")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    line = [r for r in map(json.loads, f) if r["split"] == "sample_only"][-1]
  texts = open(os.path.join(workdir, "samples", "final_step_2.txt")).read()[:-1].split("\n\n")
  assert len(texts) == 3 and all(len(t) == 32 for t in texts)
  per_token = [total / count for total, count in (
      numpy_nats(w, ids.tolist(), 63) for ids in tokenizers.GPT2Tokenizer().encode_batch(texts))]
  assert line["gen_nats_per_token"] == pytest.approx(np.mean(per_token), rel=1e-4)
  assert line["gen_ppl"] == pytest.approx(math.exp(line["gen_nats_per_token"]), rel=1e-4)
  both = main_py(*args, f"--config.eval.reference=gpt2:{checkpoint}",
                 f"--config.eval.reference_workdir={workdir}")
  assert both.returncode == 2 and "give one reference model" in both.stderr.splitlines()[-1]
  typo = main_py(*args, f"--config.eval.reference=gtp2:{checkpoint}")
  assert typo.returncode == 2 and "eval.reference must be gpt2:PATH" in typo.stderr


def test_reference_spec_is_checked(tmp_path):
  config = config_lib.base()
  config.eval.reference = f"gpt2:{tmp_path}"
  config.data.dataset = "mnist5k"
  with pytest.raises(config_lib.ConfigError, match="GPT-2 scores text samples, not 'mnist5k'"):
    reference.load_reference(config, None)
  config.data.dataset = "text_files"
  with pytest.raises(FileNotFoundError, match="config.json, .* not found"):
    reference.load_reference(config, tokenizers.CharTokenizer())
