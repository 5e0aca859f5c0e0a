"""Samples of a run's model, written into its workdir, and their metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from etils import epath

from md4.data import images
from md4.evaluation import evaluate, infill

if TYPE_CHECKING:
  from md4.training.run import Run


def draw(run: Run, params: Any, step: int, *, known=None, known_mask=None,
         name: str | None = None, nll_fn: Callable | None = None) -> dict[str, float]:
  """Samples from `params`, written to samples/<name or step_N>.txt (.png for images);
  returns sample metrics (with the sampler's network calls where the method counts them), with
  the generative perplexity under `nll_fn` when given.

  Image infilling (`known` int[B, H, W, C]) writes each masked input beside its completion.
  """
  num = run.config.sampling.num_samples
  rng = jax.random.fold_in(run.sample_rng, step)
  calls = {}
  if run.sample_with_calls:
    samples, count = run.sample_with_calls(params, rng, num, known, known_mask)
    calls = {"network_calls": int(count)}
  else:
    samples = run.sample_step(params, rng, num, known, known_mask)
  samples = np.asarray(samples)
  directory = epath.Path(run.workdir) / "samples"  # a local or bucket path
  path = str(directory / (name or f"step_{step}"))
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    if run.is_image:
      shown = samples if known_mask is None else infill.side_by_side(
          known, known_mask, samples, fill=run.data.max_count // 2)
      images.save_image_grid(shown, path + ".png", run.data.max_count)
    else:
      epath.Path(path + ".txt").write_text(
          "\n\n".join(run.data.tokenizer.decode(row) for row in samples) + "\n")
  if run.is_image:
    return {"mean_intensity": float(samples.mean() / run.data.max_count), **calls}
  report = {"unigram_entropy": float(evaluate.unigram_entropy(samples).mean()), **calls}
  if nll_fn is not None:
    report.update(evaluate.generative_perplexity(samples, nll_fn))
  return report
