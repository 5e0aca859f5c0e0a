"""Likelihood and sample metrics: held-out NELBO with a standard error, unigram entropy."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from md4 import sharding


def likelihood_report(nats_per_token: float) -> dict[str, float]:
  """bits per token (= BPC for characters) and perplexity from nats per token."""
  return {"bits_per_token": nats_per_token / math.log(2),
          "ppl": math.exp(min(nats_per_token, 700.0))}


def held_out(eval_step: Callable, params: Any, batches: Iterable[dict], mesh: Mesh, *,
             rng: jax.Array, num_batches: int,
             likelihood_metrics: tuple[str, ...]) -> dict[str, float]:
  """Means of the method's per-example metrics over `num_batches` held-out batches.

  Metrics named in `likelihood_metrics` are nats per example; they are reported per token (per
  dimension for images), as bits per token and perplexity, with the standard error of the bits
  per token over examples.
  Keys are fixed (fold_in of `rng` with the batch index), so repeated calls agree exactly.
  """
  values: dict[str, list[np.ndarray]] = {}
  count = dims = 0
  for i, batch in enumerate(batches):
    if num_batches and i >= num_batches:
      break
    dims = math.prod(next(iter(batch.values())).shape[1:])  # tokens (or pixels) per example
    out = jax.device_get(eval_step(params, sharding.global_batch(mesh, batch),
                                   jax.random.fold_in(rng, i)))
    for k, v in out.items():
      values.setdefault(k, []).append(np.asarray(v, np.float64))
    count += 1
  if not count:
    raise ValueError("the held-out split yielded no batch; lower eval.batch_size or seq_len")
  report: dict[str, float] = {"eval_examples": sum(len(v) for v in next(iter(values.values())))}
  for k, chunks in values.items():
    v = np.concatenate(chunks)
    if k in likelihood_metrics:
      per_token = v / dims
      report["loss"] = float(per_token.mean())
      report.update(likelihood_report(report["loss"]))
      report["bits_per_token_se"] = float(per_token.std(ddof=1) / math.sqrt(len(v)) / math.log(2))
    else:
      report[k] = float(v.mean())
  return report


def unigram_entropy(tokens: np.ndarray) -> np.ndarray:
  """Entropy (nats) of the token histogram of each sample: float[B] for tokens int[B, L]."""
  out = []
  for row in np.asarray(tokens):
    counts = np.unique(row, return_counts=True)[1]
    freq = counts / counts.sum()
    out.append(-(freq * np.log(freq)).sum())
  return np.asarray(out)


def count_params(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
