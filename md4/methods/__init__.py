"""The registry that wires a network to a diffusion method, keyed by `config.model_type`.

A method owns four pure functions that the training loop calls:
  init(rng) -> params
  loss(params, data, rng, train) -> (scalar loss, metrics)      # averaged over the batch
  evaluate(params, data, rng) -> {name: float[B]}                # per-example sums
  sample(params, rng, batch_size, known, known_mask) -> int[B, ...]
and names its `likelihood_metrics` (per-example nats, reported as bits). Networks know nothing
of diffusion and diffusion code knows nothing of networks; this package is the only place where
the two meet.
"""

from __future__ import annotations

import ml_collections

from md4.methods.image import Blackout, MD4Pixels
from md4.methods.text import AR, GGM, MD4, GenMD4

METHODS: dict[str, type] = {"md4": MD4, "genmd4": GenMD4, "ggm": GGM, "ar": AR,
                            "blackout": Blackout, "md4_pixels": MD4Pixels}


def create(config: ml_collections.ConfigDict, vocab_size: int, **data_stats):
  """The method named by config.model_type; `data_stats` are statistics of the training data
  that it needs (GGM's unigram noise law: noise_law)."""
  if config.model_type not in METHODS:
    raise ValueError(f"unknown model_type {config.model_type!r}; known: {', '.join(METHODS)}")
  return METHODS[config.model_type](config, vocab_size, **data_stats)
