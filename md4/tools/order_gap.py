"""What MD4's likelihood gap to an AR model is made of, on the same held-out sequences:

- the MD4 run's NELBO, which averages the network's conditionals over random orders;
- the exact likelihood of the same network decoded left to right (`masked.left_to_right_nll`);
- an AR run's exact likelihood (`--reference`).

  python -m md4.tools.order_gap runs/demo --reference runs/ar_demo [--num_batches 8]

The first difference is what the random orders cost the same network; the second what is left
between a masked network read left to right and a network trained only for that order. Bits per
character, EMA weights, the runs' held-out split (first --num_batches batches; 0: all).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import jax
import numpy as np

from md4 import config_lib
from md4.diffusion import masked
from md4.evaluation import evaluate
from md4.methods.text import network_fn
from md4.training.run import load_for_inference


def per_sequence(workdir: str, metrics: Callable, num_batches: int) -> dict[str, np.ndarray]:
  """metrics(run, params, tokens, rng) -> {name: float[B]} over the run's held-out batches,
  concatenated, with each sequence's characters under "chars"."""
  run, state, _ = load_for_inference(config_lib.load(workdir), workdir)
  lengths = np.asarray(run.data.tokenizer.token_lengths)
  step = jax.jit(lambda params, tokens, rng: metrics(run, params, tokens, rng))
  out: dict[str, list[np.ndarray]] = {}
  for i, batch in enumerate(run.data.eval_batches()):
    if num_batches and i >= num_batches:
      break
    tokens = np.asarray(batch["tokens"])
    values = jax.device_get(step(state["ema"], tokens, jax.random.fold_in(run.eval_rng, i)))
    for k, v in {**values, "chars": lengths[tokens].sum(-1)}.items():
      out.setdefault(k, []).append(np.asarray(v, np.float64))
  return {k: np.concatenate(v) for k, v in out.items()}


def md4_metrics(run, params, tokens, rng) -> dict:
  logits_fn = network_fn(run.method.model, params, None, False, padded=False)
  return {"nelbo": run.method.evaluate(params, tokens, rng)["nelbo"],
          "left_to_right": masked.left_to_right_nll(logits_fn, tokens,
                                                    vocab_size=run.method.vocab_size)}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m md4.tools.order_gap",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("workdir", help="an MD4 run")
  parser.add_argument("--reference", default="", help="an AR run on the same data and tokens")
  parser.add_argument("--num_batches", type=int, default=8,
                      help="held-out batches (0: the whole split; default 8)")
  args = parser.parse_args(argv)
  try:
    for workdir, kind in ((args.workdir, "md4"), (args.reference, "ar")):
      if workdir and config_lib.load(workdir).model_type != kind:
        raise ValueError(f"{workdir} is not an {kind} run")
    rows = per_sequence(args.workdir, md4_metrics, args.num_batches)
    if args.reference:
      ar = per_sequence(args.reference, lambda run, params, tokens, rng: run.method.evaluate(
          params, tokens, rng), args.num_batches)
      if not np.array_equal(ar["chars"], rows["chars"]):
        raise ValueError(f"{args.reference} holds other held-out sequences than {args.workdir}")
      rows["ar"] = ar["nll"]
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  names = {"nelbo": "MD4 NELBO (random orders)", "left_to_right": "MD4 network, left to right",
           "ar": "AR reference"}
  print(f"{len(rows['chars'])} held-out sequences, {int(rows['chars'].sum())} characters")
  for key, name in names.items():
    if key in rows:
      r = evaluate.bits_per_unit(rows[key], rows["chars"])
      print(f"{name:28s} {r['bits_per_char']:.3f} bits/char (se {r['bits_per_char_se']:.3f})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
