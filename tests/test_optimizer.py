"""The optimizer against a float64 numpy Muon and AdamW written from their formulas: Muon
(optax.contrib.muon) on the blocks' matrices, Nesterov AdamW elsewhere, decoupled weight decay on
matrices only, one warm-up and decay for both learning rates."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import config_lib
from md4.training.optimizer import make_optimizer

NS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: np.ndarray, steps: int) -> np.ndarray:
  """The quintic iteration x <- a x + (b A + c A^2) x, A = x x^T, from x = g / |g|_F, on the
  side with the smaller Gram matrix."""
  x = g.T if g.shape[0] > g.shape[1] else g
  x = x / (np.linalg.norm(x) + 1e-8)
  a, b, c = NS
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if g.shape[0] > g.shape[1] else x


def expected(kind, p, g, m_, v_, *, o, t: int, rate: float, ns_steps: int):
  """(update, first moment, second moment) of a leaf of `kind` at step t, learning rate `rate`."""
  if kind == "muon":
    beta = o.muon_beta
    m_new = beta * m_ + (1 - beta) * g
    nesterov = beta * m_new / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t)
    scale = max(1.0, p.shape[1] / p.shape[0]) ** 0.5
    step = newton_schulz(nesterov, ns_steps) * scale + o.weight_decay * p
    return -rate * o.muon_lr / o.lr * step, m_new, v_
  m_new = o.b1 * m_ + (1 - o.b1) * g
  v_new = o.b2 * v_ + (1 - o.b2) * g * g
  m_hat = o.b1 * m_new / (1 - o.b1 ** (t + 1)) + (1 - o.b1) * g / (1 - o.b1 ** t)
  step = m_hat / (np.sqrt(v_new / (1 - o.b2 ** t)) + 1e-8)
  if kind == "adam_decay":
    step = step + o.weight_decay * p
  return -rate * step, m_new, v_new



PARAMS = {  # which share each leaf gets: muon, adam with decay, adam without decay
    "block_0": {"mlp": {"kernel": ((16, 48), "muon")}, "attn": {"kernel": ((40, 16), "muon")},
                "norm": {"scale": ((16,), "adam"), "bias": ((16,), "adam")},
                "modulation": {"kernel": ((8, 32), "adam_decay")}},
    "embed": {"embedding": ((12, 16), "adam_decay")},
}


@pytest.mark.parametrize("ns_steps", [5, 3])
def test_muon_and_adamw_updates_match_their_formulas(ns_steps):
  config = config_lib.base()
  config.optimizer.update(name="muon", lr=3e-3, muon_lr=0.02, muon_beta=0.9, b1=0.8, b2=0.95,
                          weight_decay=0.1, warmup_steps=2, muon_ns_steps=ns_steps, grad_clip=0.0)
  o = config.optimizer
  tx, lr = make_optimizer(config, 10)
  update = jax.jit(tx.update)
  is_leaf = lambda x: isinstance(x, tuple) and isinstance(x[1], str)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s[0]), PARAMS, is_leaf=is_leaf)
  kinds = jax.tree.map(lambda s: s[1], PARAMS, is_leaf=is_leaf)
  state = tx.init(jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params))
  ours = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
  m = jax.tree.map(np.zeros_like, params)
  v = jax.tree.map(np.zeros_like, params)
  for t in range(1, 6):
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape) + 0.3, params)
    updates, state = update(jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads), state,
                               ours)
    ours = jax.tree.map(lambda p, u: p + u, ours, updates)
    rate = float(lr(t - 1))

    out = jax.tree.map(functools.partial(expected, o=o, t=t, rate=rate, ns_steps=ns_steps),
                       kinds, params, grads, m, v)
    want, m, v = (jax.tree.map(lambda _, e, i=i: e[i], kinds, out) for i in range(3))
    for path, got in jax.tree_util.tree_leaves_with_path(updates):
      exp = want
      for key in path:
        exp = exp[key.key]
      np.testing.assert_allclose(np.asarray(got), exp, rtol=2e-4,
                                 atol=2e-6 * np.abs(exp).max(),
                                 err_msg=f"step {t} {jax.tree_util.keystr(path)}")
    params = jax.tree.map(lambda p, u: p + u, params, want)
