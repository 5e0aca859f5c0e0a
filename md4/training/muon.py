"""Muon: momentum orthogonalised by a Newton-Schulz iteration, for a network's hidden matrices.

Each matrix update is the Nesterov momentum of its gradient with the singular values pushed
towards 1 (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks"), so
every direction of the matrix moves at the same rate; the other parameters (embeddings, output
head, norms, biases) use AdamW. Written for XLA:CPU as much as for accelerators: the iteration
is plain 2-D matmuls, one matrix at a time (stacked into batched matmuls, the demo's matrices
took 1.2x longer there), optionally with bfloat16 operands.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from md4.networks.matmul import matmul

# Quintic iteration x <- a x + b (x x^T) x + c (x x^T)^2 x; coefficients chosen for a steep
# slope at zero, so five steps bring singular values down to 1/50 of the largest into about
# [0.65, 1.2] (tests/test_muon.py); smaller ones grow but stay below that.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: jax.Array, steps: int = 5, operand_dtype: Any = None) -> jax.Array:
  """Approximately U V^T for g = U S V^T: float[m, n] -> float[m, n].

  `operand_dtype` (e.g. bfloat16) rounds the products' operands, accumulating in float32.
  """
  mm = functools.partial(matmul, operand_dtype=operand_dtype)
  tall = g.shape[0] > g.shape[1]
  x = g.T if tall else g  # iterate on the side with the smaller Gram matrix
  x = x / (jnp.linalg.norm(x) + 1e-7)  # singular values <= 1
  a, b, c = NEWTON_SCHULZ
  for _ in range(steps):
    gram = mm(x, x.T)
    x = a * x + mm(b * gram + c * mm(gram, gram), x)
  return x.T if tall else x


class MuonState(NamedTuple):
  momentum: Any


def scale_by_muon(beta: float = 0.95, steps: int = 5,
                  operand_dtype: Any = None) -> optax.GradientTransformation:
  """Nesterov momentum, orthogonalised (products' operands in `operand_dtype`), scaled by
  sqrt(max(1, fan_out / fan_in))."""

  def init(params):
    return MuonState(jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    momentum = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, state.momentum, updates)

    def direction(m, g):
      o = orthogonalize(beta * m + (1 - beta) * g, steps, operand_dtype)
      return o * max(1.0, g.shape[1] / g.shape[0]) ** 0.5

    return jax.tree.map(direction, momentum, updates), MuonState(momentum)

  return optax.GradientTransformation(init, update)


def muon(learning_rate: optax.ScalarOrSchedule, adam_learning_rate: optax.ScalarOrSchedule,
         is_matrix: Callable[[Any], Any], *, beta: float = 0.95, b1: float = 0.9,
         b2: float = 0.999, weight_decay: float = 0.0,
         decay_mask: Callable[[Any], Any] | None = None,
         ns_steps: int = 5, operand_dtype: Any = None) -> optax.GradientTransformation:
  """Muon for the leaves `is_matrix(params)` marks True (2-D [fan_in, fan_out]), Nesterov AdamW
  for the rest; decoupled weight decay where `decay_mask(params)` is True (default: all);
  `ns_steps` Newton-Schulz iterations, their products with operands in `operand_dtype`
  (None: float32)."""
  labels = lambda params: jax.tree.map(lambda m: "muon" if m else "adam", is_matrix(params))
  return optax.partition({
      "muon": optax.chain(scale_by_muon(beta, ns_steps, operand_dtype),
                          optax.add_decayed_weights(weight_decay, decay_mask),
                          optax.scale_by_learning_rate(learning_rate)),
      "adam": optax.adamw(adam_learning_rate, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay,
                          mask=decay_mask, nesterov=True),
  }, labels)
