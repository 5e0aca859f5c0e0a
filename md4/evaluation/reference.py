"""Reference models that score text samples (generative perplexity): an AR run of this codebase
(eval.reference_workdir), or GPT-2 from a Hugging Face snapshot (eval.reference=gpt2:PATH)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from md4 import config_lib
from md4.data import IMAGE_DATASETS
from md4.data.tokenizers import GPT2Tokenizer
from md4.networks import gpt2
from md4.training.run import TOKENIZER_FILE, load_for_inference


def check_reference_tokenizer(config: ml_collections.ConfigDict, tokenizer: Any) -> None:
  """A learned (bpe, byte_bpe) `tokenizer` must be the one the reference AR run was trained
  with."""
  workdir = config.eval.reference_workdir
  if not workdir or getattr(tokenizer, "merges", None) is None:
    return
  saved = config_lib.load(workdir).data.get("tokenizer_path")
  path = saved or os.path.join(workdir, TOKENIZER_FILE)
  try:
    same = os.path.isfile(path) and type(tokenizer).load(path).merges == tokenizer.merges
  except ValueError:  # another kind of tokenizer file
    same = False
  if not same:
    raise config_lib.ConfigError(f"eval.reference_workdir {workdir}: its BPE tokenizer ({path}) "
                                 "is not this run's")


GPT2_PREFIX = "gpt2:"


def gpt2_nll(path: str, tokenizer: Any, batch_size: int = 8) -> Callable:
  """nll_fn(samples int[B, L]) of GPT-2 (the snapshot directory `path`) for `tokenizer`'s samples.

  Each sample is decoded to text and re-encoded with GPT-2's tokenizer (tiktoken, the offline
  ranks file); its n GPT-2 tokens are scored after <|endoftext|>, in windows of at most
  n_positions - 1 tokens (each after its own <|endoftext|>). The returned nats are scaled by
  L / n, so that `evaluate.generative_perplexity` (which divides by L) reports nats per GPT-2 token.
  """
  model, params = gpt2.load_gpt2(path)
  encoder = GPT2Tokenizer()
  window = model.hparams.n_positions - 1
  nats = jax.jit(lambda p, tokens, weights: gpt2.token_nats(model, p, tokens, weights))
  logging.info("reference model for generative perplexity: GPT-2 %s (%d layers, width %d)",
               path, model.hparams.n_layer, model.hparams.n_embd)

  def nll_fn(samples: np.ndarray) -> np.ndarray:
    samples = np.asarray(samples)
    encoded = encoder.encode_batch([tokenizer.decode(row) for row in samples])
    pieces = [(i, ids[start:start + window]) for i, ids in enumerate(encoded)
              for start in range(0, max(len(ids), 1), window)]
    total, count = np.zeros(len(samples)), np.zeros(len(samples))
    for first in tqdm.trange(0, len(pieces), batch_size, desc="GPT-2 scoring", unit="batch",
                             leave=False, disable=None):
      chunk = pieces[first:first + batch_size]
      length = min(window, -(-max(len(ids) for _, ids in chunk) // 64) * 64)  # fewer shapes
      tokens = np.full((batch_size, length + 1), encoder.eot_id, np.int32)
      weights = np.zeros((batch_size, length), np.float32)
      for row, (_, ids) in enumerate(chunk):
        ids = ids if len(ids) else [encoder.eot_id]  # an empty sample: <|endoftext|> twice
        tokens[row, 1:len(ids) + 1], weights[row, :len(ids)] = ids, 1.0
      out = np.asarray(nats(params, tokens, weights), np.float64)
      for row, (i, _) in enumerate(chunk):
        total[i] += out[row]
        count[i] += weights[row].sum()
    return total / count * samples.shape[1]

  return nll_fn


def load_reference(config: ml_collections.ConfigDict, tokenizer: Any = None) -> Callable | None:
  """nll_fn(tokens int[B, L]) -> nats float[B] of the configured reference, or None.

  eval.reference=gpt2:PATH: GPT-2 scores the samples decoded with `tokenizer` (`gpt2_nll`).
  eval.reference_workdir: the AR run there, built from its own saved config.json and scored with
  its EMA weights; vocabulary and seq_len (and a learned tokenizer's merges against
  `tokenizer`'s) are checked before anything is loaded.
  """
  spec = config.eval.get("reference", "")
  workdir = config.eval.reference_workdir
  if spec:
    if workdir:
      raise config_lib.ConfigError("config: eval.reference and eval.reference_workdir are both "
                                   "set; give one reference model")
    if not spec.startswith(GPT2_PREFIX):
      raise config_lib.ConfigError(f"config: eval.reference must be gpt2:PATH (a Hugging Face "
                                   f"GPT-2 snapshot directory), got {spec!r}")
    if config.data.dataset in IMAGE_DATASETS or tokenizer is None:
      raise config_lib.ConfigError(f"config: eval.reference {spec}: GPT-2 scores text samples, "
                                   f"not {config.data.dataset!r} images")
    return gpt2_nll(spec.removeprefix(GPT2_PREFIX), tokenizer)
  if not workdir:
    return None
  reference = config_lib.load(workdir)
  config_lib.check_reference(config, reference)
  check_reference_tokenizer(config, tokenizer)
  run, state, step = load_for_inference(reference, workdir, with_data=False)
  logging.info("reference model for generative perplexity: %s (step %d)", workdir, step)
  nll, params = jax.jit(run.method.nll), state["ema"]
  return lambda tokens: nll(params, tokens)
