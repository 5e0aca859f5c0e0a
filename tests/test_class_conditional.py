"""Class-conditional MD4 on pixels: label dropout, the null class, guidance, a training step, and
the data pipeline's labels through main.py."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import config_lib
from md4.data import images as image_data
from md4.diffusion import masked
from md4.methods import image
from md4.training.optimizer import make_optimizer
from md4.training.step import init_state, train_step
from tests.conftest import ROOT

SHAPE = (4, 4, 1)
CLASSES = 3


def tiny_config(**sampling):
  c = config_lib.base()
  c.model_type = "md4_pixels"
  c.vocab_size = 256
  c.image_shape = SHAPE
  c.unet.update(base_channels=8, channel_mults=(1,), attn_resolutions=(), num_classes_cond=CLASSES)
  c.sampling.update(num_steps=6, **sampling)
  return c


def perturbed_params(method, seed=0):
  """Random init plus noise on every leaf (the logits head starts at zero: uniform outputs)."""
  params = jax.jit(method.init)(jax.random.key(seed, impl="unsafe_rbg"))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys, strict=True)])


def test_image_batches_carry_each_image_s_label(tmp_path):
  for split, n in (("train", 30), ("test", 12)):
    labels = np.arange(n, dtype=np.uint8) % 10
    np.save(tmp_path / f"{split}_images.npy",
            np.broadcast_to(labels[:, None, None, None] * 20, (n, 4, 4, 1)).astype(np.uint8))
    np.save(tmp_path / f"{split}_labels.npy", labels)
  config = {"dataset": "fashion_mnist", "path": str(tmp_path)}
  data = image_data.create_image_datasets(config, batch_size=6, seed=0, labels=True,
                                          eval_batch_size=4)
  batches = [next(data.train) for _ in range(10)] + list(data.eval_batches())
  assert len(batches) == 13
  for batch in batches:
    assert batch["labels"].dtype == np.int32 and batch["labels"].shape == (len(batch["images"]),)
    np.testing.assert_array_equal(batch["images"][:, 0, 0, 0], 20 * batch["labels"])
  shuffled = np.concatenate([b["labels"] for b in batches[:5]])
  assert len(set(shuffled.tolist())) == 10  # every class appears in 30 shuffled examples
  plain = image_data.create_image_datasets(config, batch_size=6, seed=0)
  assert set(next(plain.train)) == {"images"}
  (tmp_path / "train_labels.npy").unlink()
  with pytest.raises(FileNotFoundError, match="train_labels.npy not found"):
    image_data.create_image_datasets(config, batch_size=6, seed=0, labels=True)


def test_label_dropout_replaces_labels_at_the_configured_rate():
  labels = jnp.asarray(np.random.default_rng(0).integers(0, 10, 40_000), jnp.int32)
  dropped = np.asarray(image.drop_labels(jax.random.key(0), labels, 0.1, 10))
  replaced = dropped != np.asarray(labels)
  assert np.all(dropped[replaced] == 10)  # only ever the null class
  se = np.sqrt(0.1 * 0.9 / len(labels))
  assert abs(replaced.mean() - 0.1) < 4 * se, replaced.mean()
  assert np.array_equal(image.drop_labels(jax.random.key(0), labels, 0.0, 10), labels)


@pytest.mark.slow  # UNet compilation: ~20 s of CPU each
def test_labels_and_time_condition_the_network_and_none_is_the_null_class():
  method = image.MD4Pixels(tiny_config())  # 8 channels: GroupNorm groups of one channel
  params = perturbed_params(method)
  z = jnp.full((2, 16), 256, jnp.int32).at[:, :5].set(100)
  logits = jax.jit(lambda labels, t: method.logits_fn(params, None, False, labels)(z, t))
  t = jnp.full((2,), 0.5)
  base = logits(jnp.array([0, 0]), t)
  assert np.abs(base - logits(jnp.array([1, 1]), t)).mean() > 1e-2 * np.abs(base).mean()
  assert np.abs(base - logits(jnp.array([0, 0]), t / 4)).mean() > 1e-2 * np.abs(base).mean()
  np.testing.assert_array_equal(jax.jit(lambda t: method.logits_fn(params, None, False)(z, t))(t),
                                logits(jnp.full((2,), CLASSES), t))
  with pytest.raises(ValueError, match="needs batches with labels"):
    jax.eval_shape(method.loss, params, jnp.zeros((2, *SHAPE), jnp.int32), jax.random.key(0))


@pytest.mark.slow  # UNet compilation: ~20 s of CPU each
def test_guidance_zero_equals_the_conditional_sampler_and_guidance_changes_it():
  method = image.MD4Pixels(tiny_config())
  params = perturbed_params(method)
  labels = jnp.array([0, 1, 2, 1], jnp.int32)
  rng = jax.random.key(3)
  sample = jax.jit(method.sample_classes, static_argnums=(3, 4))
  unguided, calls = sample(params, rng, labels, 0.0, 4)
  direct = jax.jit(lambda: masked.sample(
      method.logits_fn(params, None, False, labels), rng, method.schedule, batch_size=4,
      seq_len=16, vocab_size=256, num_steps=6))()
  np.testing.assert_array_equal(unguided.reshape(4, -1), direct)
  guided, guided_calls = sample(params, rng, labels, 3.0, 4)
  assert int(guided_calls) == 2 * int(calls)  # both branches at every call
  assert not np.array_equal(guided, unguided)
  # sampling.class_label is the label of every sample.
  method = image.MD4Pixels(tiny_config(class_label=2))
  one_class, _ = jax.jit(method.sample_with_calls, static_argnums=2)(params, rng, 4)
  np.testing.assert_array_equal(one_class, sample(params, rng, jnp.full((4,), 2), 0.0, 4)[0])


@pytest.mark.slow  # UNet compilation: ~20 s of CPU each
def test_a_class_conditional_train_step_lowers_the_loss():
  config = tiny_config()
  config.optimizer.update(lr=3e-3, warmup_steps=1)
  method = image.MD4Pixels(config)
  tx, lr = make_optimizer(config, 40)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, CLASSES, 16).astype(np.int32)
  # Each class is one flat image (value 60 * (label + 1)): learnable from the label alone.
  images = np.broadcast_to((60 * (labels + 1))[:, None, None, None], (16, *SHAPE)).astype(np.int32)
  batch = {"images": jnp.asarray(images), "labels": jnp.asarray(labels)}
  state = jax.jit(lambda k: init_state(method, tx, k))(jax.random.key(0, impl="unsafe_rbg"))
  step = jax.jit(lambda s, b: train_step(s, b, method=method, tx=tx, lr=lr, config=config,
                                         rng=jax.random.key(1), data_key=None))
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all() and int(metrics["nonfinite"]) == 0
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
  embedding = state["params"]["class_embed"]["embedding"]
  assert embedding.shape == (CLASSES + 1, 32)


def test_class_config_errors():
  with pytest.raises(config_lib.ConfigError, match="classes are 0..2"):
    config_lib.validate(tiny_config(class_label=3))
  unconditional = tiny_config(guidance=1.0)
  unconditional.unet.num_classes_cond = 0
  with pytest.raises(config_lib.ConfigError, match="no conditional branch"):
    config_lib.validate(unconditional)
  text = config_lib.base()
  text.unet.num_classes_cond = 10
  with pytest.raises(config_lib.ConfigError, match="num_classes_cond is for model_type md4_pixels"):
    config_lib.validate(text)


def main_py(*args):
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=400)


@pytest.mark.slow  # UNet compilation, two processes
def test_class_conditional_pixels_from_the_command_line(tmp_path):
  rng = np.random.default_rng(0)
  data = tmp_path / "digits"
  data.mkdir()
  for split, n in (("train", 64), ("test", 16)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    np.save(data / f"{split}_images.npy", rng.integers(0, 256, (n, 8, 8, 1)).astype(np.uint8))
    np.save(data / f"{split}_labels.npy", labels)
  workdir = str(tmp_path / "run")
  common = ["--config=configs/md4_pixels_demo.py", f"--workdir={workdir}",
            f"--config.data.path={data}", "--config.image_shape=(8, 8, 1)",
            "--config.unet.base_channels=8", "--config.unet.attn_resolutions=()",
            "--config.sampling.num_steps=4", "--config.sampling.num_samples=4"]
  trained = main_py(*common, "--config.unet.num_classes_cond=10", "--config.eval.batch_size=8",
                    "--config.eval.num_batches=1", "--config.training.batch_size=8",
                    "--config.training.num_steps=3", "--config.training.eval_every=3",
                    "--config.sampling.every=0", "--config.eval.weights=('ema',)")
  assert trained.returncode == 0, trained.stderr[-3000:]
  result = main_py(*common, "--mode=sample", "--class_label=7", "--config.sampling.guidance=2")
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["bits_per_dim"] for r in records if r["split"] == "eval"][0] > 0
  sampled = [r for r in records if r["split"] == "sample_only"][-1]
  assert sampled["network_calls"] % 2 == 0  # guided: two passes per call
  for label, message in ((10, "--class_label 10: the model's classes are 0..9"),):
    bad = main_py(*common, "--mode=sample", f"--class_label={label}")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == f"error: {message}"
