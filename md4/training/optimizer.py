"""The optimizer: AdamW, or Muon on the transformer blocks' matrices, with warm-up, decay and
clipping."""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections
import optax


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int):
  """AdamW (or Muon on the blocks' matrices) with linear warm-up, then cosine, linear or no
  decay (to min_lr_ratio * lr), and global-norm clipping."""
  o = config.optimizer
  decay_steps = max(num_steps, o.warmup_steps + 1)
  if o.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, decay_steps,
                                            end_value=o.lr * o.min_lr_ratio)
  else:
    end = o.lr * o.min_lr_ratio if o.schedule == "linear" else o.lr
    lr = optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps),
                               optax.linear_schedule(o.lr, end, decay_steps - o.warmup_steps)],
                              [o.warmup_steps])
  decay_mask = functools.partial(jax.tree.map, lambda p: p.ndim >= 2)  # no decay on norms, biases
  adamw = functools.partial(optax.adamw, lr, b1=o.b1, b2=o.b2, eps=1e-8,
                            weight_decay=o.weight_decay, mask=decay_mask)
  if o.name == "muon":
    muon_lr = lambda step: lr(step) * (o.muon_lr / o.lr)  # the same warm-up and decay
    # optax's Muon sees only the blocks' matrices (every leaf it gets is 2-D, so its own AdamW
    # part gets none); the rest is masked AdamW, so norms and biases are not decayed.
    labels = lambda params: jax.tree.map(lambda m: "muon" if m else "adam",
                                         _block_matrices(params))
    opt = optax.partition({
        "muon": optax.contrib.muon(muon_lr, ns_steps=o.muon_ns_steps, beta=o.muon_beta,
                                   weight_decay=o.weight_decay, nesterov=True),
        "adam": adamw(nesterov=True),
    }, labels)
  else:
    opt = adamw()
  tx = optax.chain(optax.clip_by_global_norm(o.grad_clip) if o.grad_clip else optax.identity(),
                   opt)
  return tx, lr


def _block_matrices(params: Any) -> Any:
  """Muon's share: the 2-D kernels inside transformer blocks, except the time modulation."""
  def is_matrix(path, p):
    names = [str(getattr(k, "key", "")) for k in path]
    return (p.ndim == 2 and any(n.startswith("block_") for n in names)
            and "modulation" not in names)
  return jax.tree_util.tree_map_with_path(is_matrix, params)
