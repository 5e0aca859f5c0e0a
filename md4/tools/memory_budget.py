"""Per-chip memory budget of MD4 training (the tables of docs/scaling.md).

  python -m md4.tools.memory_budget

Parameter counts are exact (jax.eval_shape of the real model, no memory used); the other terms
follow `predict`'s formulas, which `python -m md4.tools.bench memory` checks against the compiled
train step.
"""

from __future__ import annotations

import math

import jax

from md4 import config_lib, methods
from md4.training import sharding

GB = 1e9
SEQ, VOCAB = 1024, 50257
MODELS = {"MD4-S": (12, 768, 12), "MD4-M": (24, 1024, 16)}  # depth, width, heads
TERMS = ("state", "grads", "gathered", "trunk", "attention", "head")  # predict()'s terms
GLOBAL_BATCH = 512  # configs/owt.py
# name: (HBM per chip in GB, [(model, chips, data, fsdp, grad_accum, remat)])
SETUPS = {
    "TPU v5e (16 GB)": (16, [("MD4-S", 16, 16, 1, 2, True), ("MD4-M", 32, 8, 4, 1, True)]),
    "TPU v4 (32 GB)": (32, [("MD4-S", 16, 16, 1, 2, False), ("MD4-M", 32, 16, 2, 1, True)]),
    "8x H100 (80 GB)": (80, [("MD4-S", 8, 8, 1, 1, False), ("MD4-M", 8, 8, 1, 2, False)]),
}


def owt_config(name: str, data: int = 1, fsdp: int = 1, grad_accum: int = 1,
               remat: bool = False) -> config_lib.ml_collections.ConfigDict:
  """configs/owt.py's settings (bfloat16, GPT-2 vocabulary, seq 1024) at model `name` and a mesh;
  attention as `auto` runs it on TPU (splash: a flash kernel)."""
  depth, width, heads = MODELS[name]
  c = config_lib.base()
  c.seq_len, c.vocab_size = SEQ, VOCAB
  c.model.update(depth=depth, width=width, num_heads=heads, time_conditioning=False,
                 dtype="bfloat16", remat=remat, attention="splash")
  c.training.update(batch_size=GLOBAL_BATCH, grad_accum=grad_accum)
  c.mesh.update(data=data, fsdp=fsdp)
  return c


def padded(vocab: int) -> int:
  """The head's columns: the vocabulary rounded up to 128 (model.pad_vocab_to=-1)."""
  return 128 * math.ceil(vocab / 128)


def trunk_bytes_per_token(width: int, hidden: int, itemsize: int) -> int:
  """Per layer and token, what the backward pass reads (d = width, m = MLP hidden, a = bytes of
  the activation dtype): the two norm inputs of the float32 residual stream 2 x 4d; the norms'
  outputs 2 x a d (inputs of qkv and of the MLP's projections); q, k, v 3 x a d (the flash
  kernel's residuals) and its output a d (input of attn_out); the MLP's gate and up 2 x a m and
  their product a m: 8d + a (6d + 3m)."""
  return 8 * width + itemsize * (6 * width + 3 * hidden)


def head_bytes_per_token(columns: int) -> int:
  """The head's float32 logits (held from the forward pass to the backward pass) and, at its
  peak, one more [tokens, V] float32 array: XLA:CPU's library matmul writes the product before
  the bias is added (an accelerator fuses the two), and in the backward pass the bfloat16 (or
  float32) gradient md4/diffusion/cross_entropy.py writes in one pass: 8 V bytes."""
  return 8 * columns


def predict(config, devices: int) -> dict:
  """Predicted bytes per device of `config`'s train step on `devices` (md4.tools.bench memory
  compares them with the compiled program), by term:

    state       params, EMA, Adam mu and nu: float32, split over fsdp (16 P / f); the step's
                arguments, donated to its outputs
    grads       float32 gradients of the local shard (4 P / f)
    gathered    FSDP all-gathers each split array once per step and keeps the full float32
                copy for the backward pass (4 bytes per element of every split array, f > 1),
                plus the activation-dtype copy of every matmul kernel the forward pass saves
                for the backward pass (2 bytes per element with bfloat16 operands)
    trunk       the transformer blocks' saved activations (`trunk_bytes_per_token`; with remat
                the block inputs 4d per layer plus one block's set)
    attention   [b, H, L, L] float32 probabilities per layer, unless a flash kernel runs
                (splash, cudnn): none
    head        `head_bytes_per_token` x b L
  """
  shapes = jax.eval_shape(methods.create(config, config.vocab_size).init, jax.random.key(0))
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  params = sum(math.prod(x.shape) for _, x in leaves)
  fsdp = devices // config.mesh.data if config.mesh.fsdp == -1 else config.mesh.fsdp
  m, t = config.model, config.training
  low_precision = m.dtype != "float32" or bool(m.matmul_dtype)
  split = sum(math.prod(x.shape) for _, x in leaves
              if fsdp > 1 and sharding.param_spec(x.shape, fsdp) != jax.sharding.PartitionSpec())
  kernels = sum(math.prod(x.shape) for path, x in leaves
                if jax.tree_util.keystr(path).endswith("['kernel']"))
  gathered = 4 * split + (2 * kernels if low_precision else 0)
  hidden = 32 * math.ceil(2 / 3 * m.mlp_ratio * m.width / 32)
  rows = t.batch_size // t.grad_accum // devices
  tokens = rows * config.seq_len
  per_layer = tokens * trunk_bytes_per_token(m.width, hidden, 2 if m.dtype != "float32" else 4)
  trunk = (m.depth * tokens * 4 * m.width + per_layer) if m.remat else m.depth * per_layer
  flash = m.attention in ("splash", "cudnn")
  attention = 0 if flash else m.depth * rows * m.num_heads * config.seq_len**2 * 4
  head_columns = methods.create(config, config.vocab_size).model.padded_vocab
  head = tokens * head_bytes_per_token(head_columns or config.vocab_size)
  terms = dict(zip(TERMS, (16 * params / fsdp, 4 * params / fsdp, gathered, trunk, attention,
                           head), strict=True))
  return {"params": params, **terms, "activations": trunk + attention + head,
          "total": sum(terms.values())}


def main() -> None:
  print("| model | params | params+EMA (f32) | Adam mu+nu (f32) | grads (f32) | state total |")
  print("|---|---|---|---|---|---|")
  for name in MODELS:
    p = predict(owt_config(name), 1)["params"]
    print(f"| {name} | {p / 1e6:.1f} M | {8 * p / GB:.2f} GB | {8 * p / GB:.2f} GB | "
          f"{4 * p / GB:.2f} GB | {20 * p / GB:.2f} GB |")
  print()
  print(f"Global batch {GLOBAL_BATCH} x {SEQ} tokens; "
        "micro-batch/chip = batch / grad_accum / chips; GB per chip.")
  print()
  print("| hardware | model | chips | mesh (data, fsdp) | grad_accum | micro-batch/chip | remat | "
        + " | ".join(TERMS) + " | total | HBM |")
  print("|---|---|---|---|---|---|---|" + "---|" * len(TERMS) + "---|---|")
  for hardware, (hbm, rows) in SETUPS.items():
    for name, chips, data, fsdp, accum, remat in rows:
      assert data * fsdp == chips
      r = predict(owt_config(name, data, fsdp, accum, remat), chips)
      terms = " | ".join(f"{r[k] / GB:.2f}" for k in TERMS)
      print(f"| {hardware} | {name} | {chips} | ({data}, {fsdp}) | {accum} | "
            f"{GLOBAL_BATCH // accum // chips} | {'yes' if remat else 'no'} | {terms} | "
            f"{r['total'] / GB:.2f} | {hbm} GB |")


if __name__ == "__main__":
  main()
