"""The `eval` and `sample` modes: restore the newest checkpoint of a run and score held-out
data (any data with the same vocabulary: zero-shot), or draw samples, unconditional, after a
prompt or with gaps to fill (text templates, image regions).
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from md4.data import images
from md4.evaluation import infill, samples
from md4.evaluation.reference import load_reference
from md4.training.metric_writers import MetricWriter
from md4.training.run import Run, load_for_inference


def eval_only(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Held-out metrics of the newest checkpoint's EMA weights (mode=eval).

  `config.data` may differ from the training data (zero-shot likelihood); the report names the
  data it was computed on.
  """
  run, state, step = load_for_inference(config, workdir)
  report = {**run.evaluate(state["ema"], num_batches=config.eval.num_batches), "weights": "ema",
            "data": run.data.info["description"]}
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.write(step, "eval_only", report)
  writer.close()
  return report


def conditioning(config: ml_collections.ConfigDict, *, prompt: str | None, infill_text: str | None,
                 infill_region: str | None) -> str | None:
  """Which conditioning of mode=sample applies ("prompt", "infill", "region" or None).

  Raises ValueError (one line) for a combination the model cannot take.
  """
  given = [flag for flag, value in (("--prompt", prompt), ("--infill", infill_text),
                                    ("--infill_region", infill_region)) if value]
  if len(given) > 1:
    raise ValueError(f"{' and '.join(given)} cannot be combined; give one")
  if not given:
    if config.sampling.guidance and config.sampling.class_label < 0:
      raise ValueError("sampling.guidance guides toward a conditioning: give --prompt or --infill "
                       "(the unconditional branch sees those tokens masked), or --class_label")
    return None
  if config.model_type == "blackout":
    raise ValueError(f"{given[0]}: Blackout sampling has no conditioning on known pixels "
                     "(infill images with model_type md4_pixels)")
  is_image = config.data.dataset in images.IMAGE_DATASETS
  if is_image and given[0] != "--infill_region":
    raise ValueError(f"{given[0]} is for text models; infill images with --infill_region")
  if not is_image and given[0] == "--infill_region":
    raise ValueError("--infill_region is for image models; infill text with --infill")
  return {"--prompt": "prompt", "--infill": "infill", "--infill_region": "region"}[given[0]]


def held_out_images(run: Run, num: int) -> np.ndarray:
  """The first `num` held-out images: int[num, H, W, C]."""
  batches, count = [], 0
  for batch in run.data.eval_batches():
    batches.append(batch["images"])
    count += len(batch["images"])
    if count >= num:
      return np.concatenate(batches)[:num]
  raise ValueError(f"the held-out split has {count} images, fewer than sampling.num_samples {num}")


def sample_only(config: ml_collections.ConfigDict, workdir: str, *, prompt: str | None = None,
                infill_text: str | None = None, infill_region: str | None = None) -> str:
  """Writes samples of the newest checkpoint's EMA weights to samples/final_step_N.txt (.png),
  or infill_step_N for infilling; returns the path.

  prompt: text the samples start with. infill_text: a template whose `_` are unknown tokens
  (md4.infill.text_template). infill_region: the region of held-out images to fill
  (md4.infill.image_region), for MD4 on pixels. Known tokens and pixels never change.
  """
  kind = conditioning(config, prompt=prompt, infill_text=infill_text, infill_region=infill_region)
  if kind == "region":  # checked before anything is loaded
    region_mask = infill.image_region(tuple(config.image_shape), infill_region)
  run, state, step = load_for_inference(config, workdir)
  reference = load_reference(config, getattr(run.data, "tokenizer", None))
  known = known_mask = None
  if kind == "prompt":
    length = len(run.data.tokenizer.encode(prompt))
    if length >= config.seq_len:
      raise ValueError(f"--prompt is {length} tokens long, not shorter than seq_len "
                       f"{config.seq_len}: nothing would be left to generate")
    known, known_mask = infill.prompt(prompt, run.data.tokenizer, config.seq_len)
  elif kind == "infill":
    known, known_mask = infill.text_template(infill_text, run.data.tokenizer, config.seq_len)
  elif kind == "region":
    known = held_out_images(run, config.sampling.num_samples)
    known_mask = np.broadcast_to(region_mask, known.shape)
  name = f"{'infill' if kind in ('infill', 'region') else 'final'}_step_{step}"
  report = samples.draw(run, state["ema"], step, known=known, known_mask=known_mask,
                        name=name, nll_fn=reference)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.write(step, "sample_only", {**report, "weights": "ema", "conditioning": kind or "none"})
  writer.close()
  return os.path.join(workdir, "samples", name + (".png" if run.is_image else ".txt"))
