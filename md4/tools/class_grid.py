"""Samples of a class-conditional image run: one row per class, one block of columns per
classifier-free guidance scale (0: the plain conditional sampler).

  python -m md4.tools.class_grid runs/fashion_cond --guidance 0,2 --per_class 8 \
      --out docs/images/fashion_classes.png

EMA weights of the newest checkpoint, the run's sampler (sampling.* of its config; --steps
changes the step count). Prints the network passes per sample of each scale (two per call when
guided: the class and the null class).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from md4 import config_lib
from md4.data.images import image_grid, save_png
from md4.methods.image import PIXEL_VALUES
from md4.training.checkpoints import CheckpointError
from md4.training.run import load_for_inference

GAP = 8  # white pixels between the blocks of two guidance scales


def side_by_side(blocks: Sequence[np.ndarray], max_count: int, per_row: int) -> np.ndarray:
  """Blocks int[B, H, W, C], each tiled `per_row` images a row, next to each other with a white
  gap: uint8 [h, w, C]."""
  tiles = [image_grid(block, max_count, cols=per_row) for block in blocks]
  gap = np.full((tiles[0].shape[0], GAP, tiles[0].shape[2]), 255, np.uint8)
  out = [tiles[0]]
  for tile in tiles[1:]:
    out += [gap, tile]
  return np.concatenate(out, axis=1)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m md4.tools.class_grid",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("workdir", help="a class-conditional md4_pixels run")
  parser.add_argument("--out", required=True, help="the PNG grid")
  parser.add_argument("--guidance", default="0,2", help="comma-separated guidance scales g >= 0")
  parser.add_argument("--per_class", type=int, default=8, help="samples per class and scale")
  parser.add_argument("--steps", type=int, default=0, help="sampler steps (0: the run's)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    scales = [float(g) for g in args.guidance.split(",")]
    if min(scales) < 0 or args.per_class < 1 or args.steps < 0:
      raise ValueError("--guidance needs scales >= 0, --per_class >= 1 and --steps >= 0")
    config = config_lib.load(args.workdir)
    if config.model_type != "md4_pixels" or config.unet.num_classes_cond < 1:
      raise ValueError(f"{args.workdir} is not a class-conditional md4_pixels run "
                       "(unet.num_classes_cond > 0)")
    if args.steps:
      config.sampling.num_steps = args.steps
    run, state, step = load_for_inference(config, args.workdir, with_data=False)
  except (ValueError, OSError, config_lib.ConfigError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  classes = config.unet.num_classes_cond
  labels = jnp.repeat(jnp.arange(classes, dtype=jnp.int32), args.per_class)
  blocks = []
  for i, scale in enumerate(scales):
    draw = jax.jit(lambda rng, scale=scale: run.method.sample_classes(
      state["ema"], rng, labels, scale, len(labels)))
    images, passes = draw(jax.random.key(args.seed + i))
    blocks.append(np.asarray(images))
    print(f"guidance {scale:g}: {int(passes)} network passes per sample", flush=True)
  save_png(side_by_side(blocks, PIXEL_VALUES - 1, args.per_class), args.out)
  print(f"wrote {args.out}: {classes} classes (rows) x {len(scales)} scales x {args.per_class}, "
        f"checkpoint step {step}, {config.sampling.num_steps} sampler steps")
  return 0


if __name__ == "__main__":
  sys.exit(main())
