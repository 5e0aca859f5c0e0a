"""Same-run comparison of md4.training.muon with optax.contrib.muon on the demo config.

  python -m md4.tools.bench_muon updates                   # the two updates, same gradients
  python -m md4.tools.bench_muon step                      # seconds per training step
  python -m md4.tools.bench_muon train --steps 1000 --seeds 0 1 --workdir runs/muon_cmp

`updates` feeds both the same random gradients (a block matrix, an embedding, a norm scale) and
prints the relative difference of their updates per step. `step` times the demo's compiled
training step (random tokens) with each optimizer, alternating, best of --rounds. `train` trains
the demo config for --steps (its cosine decay shortened to them) with each optimizer and seed,
and reports the final held-out bits per character. The last line is one JSON object. Settings
are matched as far as optax's options allow (docs/muon.md).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers

from configs import demo
from md4.tools import bench
from md4.training import muon

VARIANTS = ("md4", "optax")


def optax_muon(learning_rate, adam_learning_rate, is_matrix, *, beta: float, b1: float,
               b2: float, weight_decay: float, decay_mask, ns_steps: int,
               operand_dtype: Any = None) -> optax.GradientTransformation:
  """optax.contrib.muon with md4.training.muon.muon's signature and settings: Nesterov momentum,
  the same Newton-Schulz coefficients and steps, Muon on `is_matrix` leaves only, shape scaling
  sqrt(max(1, fan_out / fan_in)), decoupled weight decay (masked for Muon; optax's AdamW has no
  mask, so it also decays the norms and biases)."""
  del operand_dtype  # optax's iteration runs in the parameters' dtype
  dims = lambda params: jax.tree.map(lambda m: MuonDimensionNumbers() if m else None,
                                     is_matrix(params))
  return optax.contrib.muon(learning_rate, ns_steps=ns_steps, beta=beta, eps=1e-7,
                            weight_decay=weight_decay, weight_decay_mask=decay_mask,
                            nesterov=True, adam_b1=b1, adam_b2=b2,
                            adam_weight_decay=weight_decay, adam_learning_rate=adam_learning_rate,
                            muon_weight_dimension_numbers=dims)


@contextlib.contextmanager
def variant(name: str):
  """make_optimizer builds `name`'s Muon inside this context."""
  original = muon.muon
  muon.muon = optax_muon if name == "optax" else original
  try:
    yield
  finally:
    muon.muon = original


def cmd_step(args) -> dict:
  config = demo.get_config()
  tokens = np.random.default_rng(0).integers(0, config.vocab_size,
                                              (config.training.batch_size, config.seq_len))
  results, flops = {name: [] for name in VARIANTS}, {}
  for _ in range(args.rounds):
    for name in VARIANTS:
      with variant(name):
        timed = bench.time_train_step(config, tokens.astype(np.int32))
      results[name].append(timed["step_s"])
      flops[name] = timed["xla_flops_per_step"]
  best = {name: min(times) for name, times in results.items()}
  for name in VARIANTS:
    rounds = [round(t * 1e3, 1) for t in results[name]]
    print(f"{name}: {best[name] * 1e3:.1f} ms/step (rounds {rounds}), XLA {flops[name]:.4g} "
          "FLOP/step")
  return {"step_s": best, "rounds": results, "xla_flops_per_step": flops,
          "optax_over_md4": best["optax"] / best["md4"]}


def cmd_updates(args) -> dict:
  params = {"block_0": {"dense": {"kernel": jnp.ones((128, 512))},
                        "norm": {"scale": jnp.ones(128)}},
            "embed": {"embedding": jnp.ones((512, 128))}}
  is_matrix = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path).endswith("['kernel']"), p)
  kw = dict(beta=0.95, b1=0.9, b2=0.99, weight_decay=0.0, ns_steps=5,
            decay_mask=functools.partial(jax.tree.map, lambda p: p.ndim >= 2))
  opts = {"md4": muon.muon(0.007, 0.006, is_matrix, **kw),
          "optax": optax_muon(0.007, 0.006, is_matrix, **kw)}
  states = {name: opt.init(params) for name, opt in opts.items()}
  rng, out = np.random.default_rng(0), {}
  relative = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
  for t in range(1, args.steps + 1):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) + 0.5, jnp.float32),
                         params)
    updates = {}
    for name, opt in opts.items():
      updates[name], states[name] = opt.update(grads, states[name], params)
    out[t] = {"muon": relative(updates["md4"]["block_0"]["dense"]["kernel"],
                               updates["optax"]["block_0"]["dense"]["kernel"]),
              "adamw": relative(updates["md4"]["embed"]["embedding"],
                                updates["optax"]["embed"]["embedding"])}
    print(f"step {t}: relative difference muon {out[t]['muon']:.2g}, adamw {out[t]['adamw']:.2g}")
  return {"relative_difference": out}


def final_bits_per_char(workdir: str) -> float:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if r["split"] == "eval" and "bits_per_char" in r]
  return evals[-1]["bits_per_char"]


def cmd_train(args) -> dict:
  from md4.training import train

  results = {}
  for seed in args.seeds:
    for name in VARIANTS:
      config = demo.get_config()
      config.seed = seed
      config.training.update(num_steps=args.steps, eval_every=args.steps,
                             checkpoint_every=args.steps)
      config.sampling.every = 0
      workdir = os.path.join(args.workdir, f"{name}_seed{seed}")
      with variant(name):
        train.train(config, workdir)
      results[f"{name}_seed{seed}"] = final_bits_per_char(workdir)
      print(f"{name} seed {seed}: held-out {results[f'{name}_seed{seed}']:.4f} bits/char")
  return {"steps": args.steps, "bits_per_char": results}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  updates = sub.add_parser("updates")
  updates.add_argument("--steps", type=int, default=50)
  step = sub.add_parser("step")
  step.add_argument("--rounds", type=int, default=3)
  run = sub.add_parser("train")
  run.add_argument("--steps", type=int, default=1000)
  run.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  run.add_argument("--workdir", default="runs/muon_cmp")
  args = parser.parse_args()
  commands = {"updates": cmd_updates, "step": cmd_step, "train": cmd_train}
  print(json.dumps(commands[args.cmd](args)))


if __name__ == "__main__":
  main()
