"""Per-chip memory budget of MD4 training (the tables of docs/scaling.md).

  python -m md4.tools.memory_budget

Parameter counts are exact (jax.eval_shape of the real model, no memory used); activation sizes
are estimates from the formulas printed with the tables.
"""

from __future__ import annotations

import math

import jax

from md4 import config_lib, methods

GB = 1e9
SEQ, VOCAB = 1024, 50257
MODELS = {"MD4-S": (12, 768, 12), "MD4-M": (24, 1024, 16)}  # depth, width, heads
GLOBAL_BATCH = 512  # configs/owt.py
# name: (HBM per chip in GB, [(model, chips, data, fsdp, grad_accum, remat)])
SETUPS = {
    "TPU v5e (16 GB)": (16, [("MD4-S", 16, 16, 1, 2, True), ("MD4-M", 32, 8, 4, 1, True)]),
    "TPU v4 (32 GB)": (32, [("MD4-S", 16, 16, 1, 2, False), ("MD4-M", 32, 16, 2, 1, True)]),
    "8x H100 (80 GB)": (80, [("MD4-S", 8, 8, 1, 1, False), ("MD4-M", 8, 8, 1, 2, False)]),
}


def param_count(depth: int, width: int, heads: int) -> tuple[int, int]:
  """(parameter count, MLP hidden size) of the MD4 transformer at seq 1024, vocab 50257."""
  c = config_lib.base()
  c.seq_len, c.vocab_size = SEQ, VOCAB
  c.model.update(depth=depth, width=width, num_heads=heads, time_conditioning=False,
                 dtype="bfloat16")
  shapes = jax.eval_shape(methods.create(c, VOCAB).init, jax.random.key(0))
  mlp_hidden = 32 * math.ceil(2 / 3 * c.model.mlp_ratio * width / 32)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)), mlp_hidden


def activations_per_seq(depth: int, width: int, hidden: int, remat: bool) -> float:
  """Bytes kept for the backward pass per sequence (bf16 matmuls, float32 residual stream).

  Per layer and token without remat: residual inputs 2 x 4d (float32), norm outputs 2 x 2d,
  q, k, v 3 x 2d, attention output 2d (fused attention keeps no L x L matrix), MLP gate and up
  2 x 2m, their product 2m: 24d + 6m bytes. With remat only the block input (4d) is kept per
  layer, plus one layer's full set while it is recomputed. The head adds 2 x 4V (float32 logits
  and their gradient) per token.
  """
  per_layer = SEQ * (24 * width + 6 * hidden)
  blocks = depth * SEQ * 4 * width + per_layer if remat else depth * per_layer
  return blocks + SEQ * 2 * 4 * VOCAB


def predict(config, devices: int) -> dict:
  """Predicted bytes per device of `config`'s train step on `devices` (md4.tools.bench memory
  compares them with the compiled program): float32 state split over fsdp plus activations."""
  shapes = jax.eval_shape(methods.create(config, config.vocab_size).init, jax.random.key(0))
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  fsdp = devices // config.mesh.data if config.mesh.fsdp == -1 else config.mesh.fsdp
  m, t = config.model, config.training
  hidden = 32 * math.ceil(2 / 3 * m.mlp_ratio * m.width / 32)
  per_device = t.batch_size // t.grad_accum // devices
  state = 20 * params / fsdp
  acts = per_device * activations_per_seq(m.depth, m.width, hidden, m.remat)
  return {"params": params, "state": state, "activations": acts, "total": state + acts}


def main() -> None:
  counts = {name: param_count(*dims) for name, dims in MODELS.items()}
  print("| model | params | params+EMA (f32) | Adam mu+nu (f32) | grads (f32) | state total |")
  print("|---|---|---|---|---|---|")
  for name, (p, _) in counts.items():
    print(f"| {name} | {p / 1e6:.1f} M | {8 * p / GB:.2f} GB | {8 * p / GB:.2f} GB | "
          f"{4 * p / GB:.2f} GB | {20 * p / GB:.2f} GB |")
  print()
  print(f"Global batch {GLOBAL_BATCH} x {SEQ} tokens; "
        "micro-batch/chip = batch / grad_accum / chips.")
  print()
  print("| hardware | model | chips | mesh (data, fsdp) | grad_accum | micro-batch/chip | remat | "
        "state/chip | activations/chip | total/chip | HBM |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for hardware, (hbm, rows) in SETUPS.items():
    for name, chips, data, fsdp, accum, remat in rows:
      assert data * fsdp == chips
      per_chip = GLOBAL_BATCH // accum // chips
      p, hidden = counts[name]
      depth, width, _ = MODELS[name]
      state = 20 * p / fsdp / GB  # params, EMA, mu, nu and grads, each split over fsdp
      acts = per_chip * activations_per_seq(depth, width, hidden, remat) / GB
      print(f"| {hardware} | {name} | {chips} | ({data}, {fsdp}) | {accum} | {per_chip} | "
            f"{'yes' if remat else 'no'} | {state:.2f} GB | {acts:.2f} GB | "
            f"{state + acts:.2f} GB | {hbm} GB |")
  print()
  print("Activations per sequence (GB):")
  for name, (depth, width, _) in MODELS.items():
    hidden = counts[name][1]
    print(f"  {name} (mlp hidden {hidden}): no remat "
          f"{activations_per_seq(depth, width, hidden, False) / GB:.3f}, remat "
          f"{activations_per_seq(depth, width, hidden, True) / GB:.3f}, of which head "
          f"{SEQ * 8 * VOCAB / GB:.3f}")


if __name__ == "__main__":
  main()
