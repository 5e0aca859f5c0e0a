"""Reference models that score text samples (generative perplexity): an AR run of this codebase."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from md4 import config_lib
from md4.data.tokenizers import BPETokenizer
from md4.training.run import TOKENIZER_FILE, load_for_inference


def check_reference_tokenizer(config: ml_collections.ConfigDict, tokenizer: Any) -> None:
  """A learned (bpe) `tokenizer` must be the one the reference AR run was trained with."""
  workdir = config.eval.reference_workdir
  if not workdir or getattr(tokenizer, "merges", None) is None:
    return
  saved = config_lib.load(workdir).data.get("tokenizer_path")
  path = saved or os.path.join(workdir, TOKENIZER_FILE)
  if not os.path.isfile(path) or BPETokenizer.load(path).merges != tokenizer.merges:
    raise config_lib.ConfigError(f"eval.reference_workdir {workdir}: its BPE tokenizer ({path}) "
                                 "is not this run's")


def load_reference(config: ml_collections.ConfigDict, tokenizer: Any = None) -> Callable | None:
  """nll_fn(tokens int[B, L]) -> nats float[B] of the AR run in config.eval.reference_workdir.

  The reference is built from its own saved config.json and scored with its EMA weights; None
  when no reference is configured. Vocabulary and seq_len (and a learned tokenizer's merges
  against `tokenizer`'s) are checked before anything is loaded.
  """
  workdir = config.eval.reference_workdir
  if not workdir:
    return None
  reference = config_lib.load(workdir)
  config_lib.check_reference(config, reference)
  check_reference_tokenizer(config, tokenizer)
  run, state, step = load_for_inference(reference, workdir, with_data=False)
  logging.info("reference model for generative perplexity: %s (step %d)", workdir, step)
  nll, params = jax.jit(run.method.nll), state["ema"]
  return lambda tokens: nll(params, tokens)
