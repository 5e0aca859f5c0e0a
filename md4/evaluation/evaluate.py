"""Likelihood and sample metrics: held-out NELBO with a standard error, generative perplexity
under a reference model, unigram entropy."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh

from md4.training import sharding


def likelihood_report(nats_per_token: float) -> dict[str, float]:
  """bits per token (= BPC for characters) and perplexity from nats per token."""
  return {"bits_per_token": nats_per_token / math.log(2),
          "ppl": math.exp(min(nats_per_token, 700.0))}


UNITS = "units"  # the per-example count of characters (or bytes) an eval step may return


def bits_per_unit(nats: np.ndarray, units: np.ndarray, unit: str = "char") -> dict[str, float]:
  """Total bits over total characters (or bytes: `unit`) of examples with `nats` float[N] and
  `units` int[N], with the standard error of this ratio estimator over examples; keys
  bits_per_{unit} and bits_per_{unit}_se."""
  ratio = nats.sum() / units.sum()
  residual = nats - ratio * units
  se = math.sqrt((residual ** 2).sum() / (len(nats) * (len(nats) - 1))) / units.mean()
  return {f"bits_per_{unit}": float(ratio / math.log(2)),
          f"bits_per_{unit}_se": float(se / math.log(2))}


def held_out(eval_step: Callable, params: Any, batches: Iterable[dict], mesh: Mesh, *,
             rng: jax.Array, num_batches: int, likelihood_metrics: tuple[str, ...],
             time_samples: int = 1, unit: str = "char",
             split_batches: int | None = None) -> dict[str, float]:
  """Means of the method's per-example metrics over `num_batches` held-out batches.

  Each example is evaluated with `time_samples` independent draws of the method's randomness
  (diffusion times and masks) and its metrics averaged over them before the mean over examples.
  Metrics named in `likelihood_metrics` are nats per example; they are reported per token (per
  dimension for images), as bits per token and perplexity, with the standard error of the bits
  per token over examples (which shrinks as time_samples removes Monte Carlo noise). When the
  eval step also returns each example's count of characters or bytes (`UNITS`; `unit` names
  them), bits per character (or byte) are the total bits over the total count. Keys are fixed
  (fold_in of `rng` with the batch index and the draw), so repeated calls agree exactly.
  `split_batches` (the split's batch count, when known) sizes the progress bar of a whole pass.
  """
  values: dict[str, list[np.ndarray]] = {}
  count = dims = 0
  batches = tqdm.tqdm(batches, total=num_batches or split_batches, desc="held-out", unit="batch",
                      leave=False, disable=None)  # on stderr, only when it is a terminal
  for i, batch in enumerate(batches):
    if num_batches and i >= num_batches:
      break
    dims = math.prod(next(iter(batch.values())).shape[1:])  # tokens (or pixels) per example
    batch = sharding.global_batch(mesh, batch)
    draws = [jax.device_get(eval_step(params, batch, jax.random.fold_in(
        jax.random.fold_in(rng, i), j))) for j in range(time_samples)]
    for k in draws[0]:
      values.setdefault(k, []).append(np.mean([np.asarray(d[k], np.float64) for d in draws], 0))
    count += 1
  if not count:
    raise ValueError("the held-out split yielded no batch; lower eval.batch_size or seq_len")
  report: dict[str, float] = {"eval_examples": sum(len(v) for v in next(iter(values.values()))),
                              "time_samples": time_samples}
  units = np.concatenate(values.pop(UNITS)) if UNITS in values else None
  for k, chunks in values.items():
    v = np.concatenate(chunks)
    if k in likelihood_metrics:
      per_token = v / dims
      report["loss"] = float(per_token.mean())
      report.update(likelihood_report(report["loss"]))
      report["bits_per_token_se"] = float(per_token.std(ddof=1) / math.sqrt(len(v)) / math.log(2))
      if units is not None:
        report.update(bits_per_unit(v, units, unit))
    else:
      report[k] = float(v.mean())
  return report


def generative_perplexity(samples: np.ndarray, nll_fn: Callable[[np.ndarray], Any]
                          ) -> dict[str, float]:
  """Perplexity of samples int[B, L] under a reference model, with a standard error.

  `nll_fn(tokens int[B, L]) -> float[B]` returns the reference model's negative log-likelihood
  in nats per sequence (e.g. this codebase's AR model, or any larger pretrained one). Reported:
  `gen_ppl` = exp(mean nats per token), `gen_nats_per_token` and its standard error over samples.
  """
  samples = np.asarray(samples)
  if samples.ndim != 2 or len(samples) < 2:
    raise ValueError(f"generative perplexity needs int[B, L] samples with B >= 2, got shape "
                     f"{samples.shape}")
  per_token = np.asarray(nll_fn(samples), np.float64) / samples.shape[1]
  mean = float(per_token.mean())
  return {"gen_ppl": math.exp(min(mean, 700.0)), "gen_nats_per_token": mean,
          "gen_nats_per_token_se": float(per_token.std(ddof=1) / math.sqrt(len(per_token)))}


def unigram_entropy(tokens: np.ndarray) -> np.ndarray:
  """Entropy (nats) of the token histogram of each sample: float[B] for tokens int[B, L]."""
  out = []
  for row in np.asarray(tokens):
    counts = np.unique(row, return_counts=True)[1]
    freq = counts / counts.sum()
    out.append(-(freq * np.log(freq)).sum())
  return np.asarray(out)
