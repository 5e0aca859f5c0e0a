"""Sharded training: (data, fsdp) meshes reproduce the one-device run; bfloat16 keeps float32 state.

The mesh measurements need 8 devices, so they run in a subprocess (this file executed as a
script) with 8 simulated CPU devices; the pytest process has already initialised JAX with one.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import config_lib, methods
from md4.training import sharding
from md4.training.optimizer import make_optimizer
from md4.training.step import init_state, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(8, 1), (4, 2), (2, 4)]
NUM_STEPS = 5
MIN_SIZE = 1024  # shard every array of >= 1024 elements (the production default is 2**18)
BIG_KERNEL = ("block_0", "mlp_gate", "kernel")  # float[32, 96]


def tiny_config(dtype: str = "float32"):
  c = config_lib.base()
  c.seq_len = 16
  c.model.update(width=32, depth=1, num_heads=2, dtype=dtype)
  c.optimizer.update(lr=1e-2, warmup_steps=2)
  c.training.update(batch_size=16, num_steps=NUM_STEPS)
  return c


def run_steps(config, mesh, min_size: int = MIN_SIZE):
  """NUM_STEPS train steps on random tokens over `mesh`: (losses, final state)."""
  method = methods.create(config, config.vocab_size)
  tx, lr = make_optimizer(config, NUM_STEPS)
  init_rng, train_rng = jax.random.split(jax.random.key(0))
  init = functools.partial(init_state, method, tx)
  shardings = sharding.state_shardings(mesh, jax.eval_shape(init, init_rng), min_size)
  state = jax.jit(init, out_shardings=shardings)(init_rng)
  step = jax.jit(functools.partial(train_step, method=method, tx=tx, lr=lr, config=config,
                                   rng=train_rng), out_shardings=(shardings, None))
  tokens = np.random.default_rng(0).integers(
      0, config.vocab_size, (NUM_STEPS, config.training.batch_size, config.seq_len), np.int32)
  losses = []
  for batch in tokens:
    state, metrics = step(state, sharding.global_batch(mesh, {"tokens": batch}))
    losses.append(float(metrics["loss"]))
  return losses, state


def describe(array: jax.Array) -> dict:
  return {"spec": [a for a in array.sharding.spec],
          "shard_shapes": sorted({tuple(s.data.shape) for s in array.addressable_shards}),
          "num_shards": len(array.addressable_shards)}


def leaf_dtypes(tree) -> dict[str, str]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path): str(x.dtype) for path, x in leaves}


def measure() -> dict:
  """Losses and final params on one device (float32 and bfloat16) and on each mesh of MESHES,
  plus shard layouts and the dtypes of the bfloat16 run's state."""
  config = tiny_config()
  one_device = sharding.make_mesh(1, 1, jax.devices()[:1])
  ref_losses, ref_state = run_steps(config, one_device)
  ref_params = jax.tree.leaves(jax.device_get(ref_state["params"]))
  bf16_config = tiny_config("bfloat16")
  bf16_losses, bf16_state = run_steps(bf16_config, one_device)
  method = methods.create(bf16_config, bf16_config.vocab_size)
  loss, _ = jax.eval_shape(method.loss, bf16_state["params"], jnp.zeros((2, 16), jnp.int32),
                           jax.random.key(0))
  out = {"devices": jax.device_count(), "reference": ref_losses, "meshes": {},
         "bf16": {"losses": bf16_losses, "state_dtypes": leaf_dtypes(bf16_state),
                  "loss_dtype": str(loss.dtype)}}
  for data, fsdp in MESHES:
    losses, state = run_steps(config, sharding.make_mesh(data, fsdp))
    params = jax.tree.leaves(jax.device_get(state["params"]))
    adam = state["opt_state"][1][0]
    get = lambda tree: functools.reduce(lambda t, k: t[k], BIG_KERNEL, tree)
    out["meshes"][f"{data}x{fsdp}"] = {
        "losses": losses,
        "max_param_diff": max(float(np.abs(a - b).max())
                              for a, b in zip(params, ref_params, strict=True)),
        "kernel": describe(get(state["params"])), "mu": describe(get(adam.mu)),
        "nu": describe(get(adam.nu)), "ema": describe(get(state["ema"])),
        "bias": describe(state["params"]["head"]["bias"]),  # 27 elements: replicated
    }
  return out


@pytest.fixture(scope="module")
def measured():
  # Unoptimised XLA code halves the compile time, which dominates here.
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true"}
  result = subprocess.run([sys.executable, "-m", "tests.test_sharding"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_meshes_match_single_device(measured):
  assert measured["devices"] == 8
  ref = np.asarray(measured["reference"])
  assert np.all(np.isfinite(ref))  # (random tokens: the losses only need to agree across meshes)
  for name, m in measured["meshes"].items():
    # Same keys, same batch, same math: only the reduction order of the collectives differs.
    np.testing.assert_allclose(m["losses"], ref, rtol=2e-5, atol=2e-6, err_msg=name)
    # Adam divides by sqrt(nu): rounding differences of tiny gradients reach ~1e-5 in params.
    assert m["max_param_diff"] < 1e-4, (name, m["max_param_diff"])


@pytest.mark.parametrize("mesh", [f"{d}x{f}" for d, f in MESHES])
def test_state_is_sharded_as_declared(measured, mesh):
  m = measured["meshes"][mesh]
  fsdp = int(mesh.split("x")[1])
  for leaf in ("kernel", "mu", "nu", "ema"):  # params, both Adam moments and EMA alike
    layout = m[leaf]
    assert layout["num_shards"] == 8
    if fsdp == 1:
      assert layout["spec"] == [] and layout["shard_shapes"] == [[32, 96]]
    else:  # the largest axis (96) split over fsdp, replicated over data
      assert layout["spec"] == [None, "fsdp"], layout
      assert layout["shard_shapes"] == [[32, 96 // fsdp]], layout
  assert m["bias"]["spec"] == [] and m["bias"]["shard_shapes"] == [[27]]


def test_param_spec_rule():
  assert sharding.param_spec((768, 3072), 4) == jax.sharding.PartitionSpec(None, "fsdp")
  assert sharding.param_spec((50257, 768), 4) == jax.sharding.PartitionSpec(None, "fsdp")
  assert sharding.param_spec((768, 3072), 1) == jax.sharding.PartitionSpec()
  assert sharding.param_spec((768,), 4) == jax.sharding.PartitionSpec()  # below min_size
  with pytest.raises(ValueError, match="does not match"):
    sharding.make_mesh(3, 1, jax.devices()[:1])


def test_bfloat16_keeps_float32_state_and_loss(measured):
  bf16 = measured["bf16"]
  dtypes = bf16["state_dtypes"]
  counters = {k for k in dtypes if k == "['step']" or k.endswith(".count")}
  assert {dtypes[k] for k in counters} == {"int32"}
  # params, Adam mu and nu, EMA: 4 x 18 arrays, all float32 although the matmuls run in bfloat16.
  floats = {dtypes[k] for k in dtypes if k not in counters}
  assert sum(k.startswith("['params']") for k in dtypes) == 18
  assert len(dtypes) - len(counters) == 4 * 18 and floats == {"float32"}, dtypes
  assert bf16["loss_dtype"] == "float32"
  assert np.all(np.isfinite(bf16["losses"]))
  # bfloat16 matmuls keep ~3 significant digits: the loss trajectories agree to 2% but not
  # exactly (the first two agree exactly: zero-initialised output layers and lr = 0 at step 0).
  rel = np.abs(np.asarray(bf16["losses"]) / np.asarray(measured["reference"]) - 1)
  assert 0 < rel.max() < 2e-2, rel


LOCAL_MESHES = [(8, 1), (4, 2)]


def accel_config(model_type: str):
  c = tiny_config()
  c.model_type = model_type
  c.diffusion.head_fraction = 0.5  # md4: the masked-position head
  c.model.local_mix = 3 if model_type == "md4" else 0  # md4: the local branch (configs/demo.py)
  c.ggm.sweeps = 1
  return c


def measure_local() -> dict:
  """Collectives of compiled MD4 (masked-position head) and GGM steps on LOCAL_MESHES, and
  grad_accum=2 gradients on 8 devices against one device."""
  from md4.tools import bench
  from md4.training.step import accumulated_grads, mesh_context
  out = {"collectives": {}}
  for model_type in ("md4", "ggm"):
    for data, fsdp in LOCAL_MESHES:
      config = accel_config(model_type)
      config.mesh.update(data=data, fsdp=fsdp)
      compiled, abstract = bench.compile_train_step(config)
      largest = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract["params"]))
      out["collectives"][f"{model_type} {data}x{fsdp}"] = {
          "ops": bench.collectives(compiled.as_text()), "largest_param_bytes": largest}
  config = accel_config("md4")
  config.training.grad_accum = 2
  method = methods.create(config, config.vocab_size)
  params = method.init(jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, 27, (16, config.seq_len), np.int32)
  grads_fn = functools.partial(accumulated_grads, method=method, accum=2)
  ref_grads, ref_metrics = jax.jit(grads_fn)(params, tokens, jax.random.key(1))
  mesh = sharding.make_mesh(8, 1)

  def sharded(params, tokens, rng):
    with mesh_context(mesh):
      return grads_fn(params, tokens, rng)

  step = jax.jit(sharded)
  args = (jax.device_put(params, sharding.replicated(mesh)),
          sharding.global_batch(mesh, {"tokens": tokens})["tokens"], jax.random.key(1))
  grads, metrics = step(*args)
  out["accum"] = {
      "loss": [float(ref_metrics["loss"]), float(metrics["loss"])],
      "max_grad_diff": max(float(np.abs(a - b).max()) for a, b in zip(
          jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True)),
      "max_grad": max(float(np.abs(a).max()) for a in jax.tree.leaves(ref_grads)),
      "ops": bench.collectives(step.lower(*args).compile().as_text())}
  return out


@pytest.fixture(scope="module")
def local():
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run([sys.executable, "-m", "tests.test_sharding", "local"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


MOVES = ("all-gather", "all-to-all", "collective-permute")  # collectives that move activations


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"{m} {d}x{f}" for m in ("md4", "ggm") for d, f in LOCAL_MESHES])
def test_compiled_steps_gather_no_activations(local, name):
  # The tiny model's parameters stay replicated (below the FSDP threshold of 2**18 elements), so
  # any all-gather, all-to-all or permute would move activations: there must be none, only the
  # gradients' (and the capacity test's) all-reduces. A gather over flat indices into B * L
  # (the old head) all-gathers its [B * L, D] operand here.
  m = local["collectives"][name]
  moved = [op for op in m["ops"] if op["kind"] in MOVES]
  assert moved == [], moved
  assert {op["kind"] for op in m["ops"]} <= {"all-reduce"}


@pytest.mark.slow
def test_grad_accum_on_8_devices_equals_one_device_without_moving_data(local):
  a = local["accum"]
  np.testing.assert_allclose(a["loss"][1], a["loss"][0], rtol=1e-6)
  assert a["max_grad_diff"] < 1e-6 * max(1.0, a["max_grad"]), a
  # Each micro-batch is the strided rows i, i + 2, ... of every device's block: pinned to all 8
  # devices by the constraint, and nothing but the gradients' all-reduce crosses devices.
  kinds = {op["kind"] for op in a["ops"]}
  assert kinds == {"all-reduce"}, a["ops"]


if __name__ == "__main__":
  print(json.dumps(measure_local() if sys.argv[1:] == ["local"] else measure()))
