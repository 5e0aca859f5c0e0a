"""The optimizer step itself: gradient accumulation is exact, and without it the step compiles to
what XLA:CPU runs fast."""

import collections
import functools

import jax
import numpy as np
import pytest

from md4 import config_lib, methods
from md4.training.optimizer import make_optimizer
from md4.training.step import init_state, train_step


def compiled_step(config):
  method = methods.create(config, config.vocab_size)
  tx, lr = make_optimizer(config, 10)
  state = jax.jit(functools.partial(init_state, method, tx))(jax.random.key(0))
  rng = jax.random.key(1)
  data_key = "images" if config.model_type == "blackout" else "tokens"
  step = jax.jit(functools.partial(train_step, method=method, tx=tx, lr=lr, config=config,
                                   rng=rng, data_key=data_key))
  return method, state, rng, step


@pytest.mark.parametrize("schedule, quarter, end", [
    ("cosine", 0.1 + 0.45 * (1 + np.cos(np.pi / 4)), 0.1), ("linear", 1 - 0.9 / 4, 0.1),
    ("constant", 1.0, 1.0)])
def test_learning_rate_schedules(schedule, quarter, end):
  # Warm-up to lr over 100 steps, then decay over the remaining 900 to min_lr_ratio * lr;
  # step 325 is a quarter of the way through the decay.
  config = config_lib.base()
  config.optimizer.update(lr=2e-3, warmup_steps=100, schedule=schedule, min_lr_ratio=0.1)
  _, lr = make_optimizer(config, 1000)
  got = [float(lr(s)) / 2e-3 for s in (0, 50, 100, 325, 1000)]
  np.testing.assert_allclose(got, [0.0, 0.5, 1.0, quarter, end], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_unet_step_has_only_canonical_convolutions(grad_accum):
  # A gradient computed inside a loop body (even of length 1) keeps JAX's transpose-rule
  # convolution layouts, which XLA:CPU runs on a naive emitter (jax-ml/jax#12868): the Blackout
  # demo's step took 1.65 s instead of 0.14 s, and 1.53 s instead of 0.08 s with grad_accum=2
  # before the accumulation loop was unrolled on CPU.
  c = config_lib.base()
  c.model_type, c.data.dataset, c.vocab_size = "blackout", "mnist", 2
  c.unet.update(base_channels=8, channel_mults=(1,), attn_resolutions=())
  c.training.update(batch_size=4, grad_accum=grad_accum)
  _, state, _, step = compiled_step(c)
  images = np.zeros((4, 28, 28, 1), np.int32)
  hlo = step.lower(state, {"images": images}).compile().as_text()
  labels = collections.Counter(line.split("dim_labels=")[1].split(",")[0]
                               for line in hlo.splitlines() if " convolution(" in line)
  assert set(labels) == {"b01f_01io->b01f"}, labels


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_accumulation_averages_micro_batches():
  c = config_lib.base()
  c.seq_len = 16
  c.model.update(width=32, depth=1, num_heads=2)
  c.training.update(batch_size=8, grad_accum=2)
  method, state, rng, step = compiled_step(c)
  tokens = np.random.default_rng(0).integers(0, c.vocab_size, (8, 16), np.int32)
  _, metrics = step(state, {"tokens": tokens})
  keys = jax.random.split(jax.random.fold_in(rng, 0), 2)
  loss = jax.jit(method.loss)
  micro = [float(loss(state["params"], half, key)[0])
           for half, key in zip(np.split(tokens, 2), keys, strict=True)]
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(micro), rtol=1e-5)


def test_muon_orthogonalises_block_matrices_and_adam_updates_the_rest():
  c = config_lib.base()
  c.seq_len = 16
  c.model.update(width=32, depth=2, num_heads=2, time_conditioning=False)
  c.optimizer.update(name="muon", lr=1e-3, muon_lr=0.02, warmup_steps=0, schedule="constant",
                     grad_clip=0.0)
  params = jax.jit(methods.create(c, c.vocab_size).init)(jax.random.key(0))
  tx, _ = make_optimizer(c, 10)
  rng = np.random.default_rng(0)

  def ill_conditioned(p):  # singular values from 1 to 20 for matrices
    if p.ndim != 2:
      return rng.normal(size=p.shape)
    u, _ = np.linalg.qr(rng.normal(size=(p.shape[0], min(p.shape))))
    v, _ = np.linalg.qr(rng.normal(size=(p.shape[1], min(p.shape))))
    return (u * np.geomspace(1, 20, min(p.shape))) @ v.T

  grads = jax.tree.map(ill_conditioned, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  muon_names = set()
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    name = jax.tree_util.keystr(path)
    if "block_" in name and u.ndim == 2:
      muon_names.add(path[1].key)
      s = np.linalg.svd(np.asarray(u), compute_uv=False)
      assert s.max() / s.min() < 2, (name, s)
    else:  # (Nesterov) Adam's first step: -lr * (1 + b1 (1 - b1) / (1 - b1^2)) * sign(g)
      np.testing.assert_allclose(np.abs(u), 1e-3 * (1 + 0.9 * 0.1 / 0.19), rtol=1e-4,
                                 err_msg=name)
  assert muon_names == {"qkv", "attn_out", "mlp_gate", "mlp_up", "mlp_out"}


@pytest.mark.slow  # two train-step compilations
def test_accumulated_gradients_equal_full_batch_gradients():
  """AR's loss is deterministic, so two micro-batches of 4 must give the gradient of the batch
  of 8 exactly. Adam's first moments after one step are (1 - b1) g, its second (1 - b2) g^2:
  the optimizer state exposes the whole gradient pytree (no clipping)."""
  states = []
  for grad_accum in (1, 2):
    c = config_lib.base()
    c.model_type, c.seq_len = "ar", 16
    c.model.update(width=32, depth=1, num_heads=2, time_conditioning=False)
    c.optimizer.grad_clip = 0.0
    c.training.update(batch_size=8, grad_accum=grad_accum)
    _, state, _, step = compiled_step(c)
    tokens = np.random.default_rng(0).integers(0, c.vocab_size, (8, 16), np.int32)
    states.append(step(state, {"tokens": tokens}))
  (full, full_metrics), (accumulated, accumulated_metrics) = states
  np.testing.assert_allclose(accumulated_metrics["grad_norm"], full_metrics["grad_norm"],
                             rtol=1e-5)
  np.testing.assert_allclose(accumulated_metrics["loss"], full_metrics["loss"], rtol=1e-5)
  leaves = jax.tree.leaves(full["opt_state"])
  assert sum(np.size(leaf) for leaf in leaves) > 2 * sum(
      np.size(p) for p in jax.tree.leaves(full["params"]))  # both moments are in there
  for a, b in zip(jax.tree.leaves(accumulated["opt_state"]), leaves, strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-9)
