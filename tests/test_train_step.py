"""The optimizer step itself: gradient accumulation is exact, and without it the step compiles to
what XLA:CPU runs fast."""

import collections
import functools

import jax
import numpy as np
import pytest

from md4 import config_lib, methods, train


def compiled_step(config):
  method = methods.create(config, config.vocab_size)
  tx, lr = train.make_optimizer(config, 10)
  state = jax.jit(functools.partial(train.init_state, method, tx))(jax.random.key(0))
  rng = jax.random.key(1)
  data_key = "images" if config.model_type == "blackout" else "tokens"
  step = jax.jit(functools.partial(train.train_step, method=method, tx=tx, lr=lr, config=config,
                                   rng=rng, data_key=data_key))
  return method, state, rng, step


@pytest.mark.parametrize("grad_accum", [1, 2])
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


def test_accumulation_averages_micro_batches():
  c = config_lib.base()
  c.seq_len = 16
  c.model.update(width=32, depth=1, num_heads=2)
  c.training.update(batch_size=8, grad_accum=2)
  method, state, rng, step = compiled_step(c)
  tokens = np.random.default_rng(0).integers(0, c.vocab_size, (8, 16), np.int32)
  _, metrics = step(state, {"tokens": tokens})
  keys = jax.random.split(jax.random.fold_in(rng, 0), 2)
  micro = [float(method.loss(state["params"], half, key)[0])
           for half, key in zip(np.split(tokens, 2), keys, strict=True)]
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(micro), rtol=1e-5)
