"""Benchmarks: training throughput against the measured matmul peak, and sampling cost.

  python -m md4.tools.bench train  --layers 6 --width 256 --heads 8 --seq_len 256 --vocab 27 \
      --batch 16
  python -m md4.tools.bench sample --layers 6 --width 256 --heads 8 --seq_len 256 --vocab 27 \
      --batch 8 --steps 256
  python -m md4.tools.bench ggm    --layers 6 --width 256 --heads 8 --seq_len 256 --batch 8 \
      --vocabs 27 50257
  python -m md4.tools.bench ggm    --layers 4 --width 128 --heads 4 --seq_len 48 --batch 32 \
      --vocabs 512 --vocab 512 --steps 48 --sweeps 2   # demo shape: GGM beside MD4
  python -m md4.tools.bench memory      --config=configs/owt.py --devices=8 [--config.mesh...]
  python -m md4.tools.bench collectives --config=configs/owt.py --devices=8 [--config.mesh...]

`memory` and `collectives` compile the real train step of a config on `--devices` simulated CPU
devices (the mesh of its `mesh` fields) without running it: the per-device bytes XLA allocates
(memory_analysis) next to md4/tools/memory_budget.py's prediction, and every collective of the
compiled program with its operand shape and bytes, next to the largest parameter's bytes.

Random weights and random tokens: a benchmark measures the program, not the model. Each command
prints readable lines and, last, one JSON object. Variants are timed in the same run, so their
ratios are meaningful even on a noisy machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from md4 import config_lib, methods
from md4.diffusion import masked
from md4.methods import text
from md4.networks import DTYPES
from md4.tools import memory_budget
from md4.training import sharding, tcmalloc
from md4.training.optimizer import make_optimizer
from md4.training.step import init_state, train_step


def best_time(fn, *args, repeats: int = 5) -> float:
  """Fastest of `repeats` timed calls after one warm-up call (seconds)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def matmul_peak_gflops(n: int = 2048, dtype=jnp.float32) -> float:
  """Measured peak of this machine: a jitted n x n @ n x n matmul, in GFLOP/s."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  return 2 * n**3 / best_time(jax.jit(jnp.matmul), a, b) / 1e9


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_config(args) -> config_lib.ml_collections.ConfigDict:
  c = config_lib.base()
  c.seq_len, c.vocab_size = args.seq_len, args.vocab
  c.model.update(width=args.width, depth=args.layers, num_heads=args.heads, dtype=args.dtype,
                 time_conditioning=not args.no_time)
  c.training.update(batch_size=args.batch)
  c.sampling.update(num_steps=getattr(args, "steps", 1))
  return c


def model_flops_per_token(params, config) -> float:
  """Training FLOPs per token of the model's matrix products (the usual MFU count).

  3 x (2 x the per-token kernel parameters + 4 L D per layer for q k^T and p v); the per-example
  time-conditioning layers are left out. XLA's own count (also reported) adds elementwise work
  on CPU and misses library calls on GPU, so it is a cross-check only.
  """
  per_example = ("modulation", "time_mlp")
  kernels = sum(int(np.prod(leaf.shape)) for path, leaf in
                jax.tree_util.tree_flatten_with_path(params)[0]
                if jax.tree_util.keystr(path).endswith("['kernel']")
                and not any(name in jax.tree_util.keystr(path) for name in per_example))
  attention = 4 * config.model.depth * config.seq_len * config.model.width
  return 3.0 * (2 * kernels + attention)


def time_train_step(config, tokens) -> dict:
  """Seconds per optimizer step, model FLOPs per step and XLA's FLOP count of the real step."""
  method = methods.create(config, config.vocab_size)
  tx, lr = make_optimizer(config, 1000)
  rng = jax.random.key(0)
  state = jax.jit(functools.partial(init_state, method, tx))(rng)
  step = jax.jit(functools.partial(train_step, method=method, tx=tx, lr=lr, config=config,
                                   rng=rng))
  compiled = step.lower(state, {"tokens": tokens}).compile()
  xla_flops = compiled.cost_analysis()
  xla_flops = (xla_flops[0] if isinstance(xla_flops, list) else xla_flops)["flops"]

  def run(state):
    return compiled(state, {"tokens": tokens})[0]

  return {"step_s": best_time(run, state), "xla_flops_per_step": float(xla_flops),
          "flops_per_step": model_flops_per_token(state["params"], config) * tokens.size}


def cmd_train(args) -> dict:
  config = bench_config(args)
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len), 0, args.vocab)
  peak = matmul_peak_gflops(args.peak_n, DTYPES[args.dtype])
  print(f"devices: {jax.devices()}; allocator: {tcmalloc.allocator()}")
  print(f"measured {args.dtype} matmul peak ({args.peak_n}^3): {peak:.1f} GFLOP/s")
  results = {}
  for name, fraction in (("full_head", 1.0), ("masked_head", args.head_fraction)):
    config.diffusion.head_fraction = fraction
    r = time_train_step(config, tokens)
    r["tokens_per_s"] = tokens.size / r["step_s"]
    r["peak_fraction"] = r["flops_per_step"] / r["step_s"] / 1e9 / peak
    print(f"{name:12s} step {r['step_s'] * 1e3:7.1f} ms  {r['tokens_per_s']:9.0f} tokens/s  "
          f"{r['flops_per_step'] / 1e9:7.1f} model GFLOP/step ({r['xla_flops_per_step'] / 1e9:.1f}"
          f" by XLA's count)  {100 * r['peak_fraction']:5.1f}% of peak")
    results[name] = r
  best = max(results.values(), key=lambda r: r["tokens_per_s"])
  # The optimizer's share: the full-head step with Muon on the blocks' matrices.
  config.diffusion.head_fraction, config.optimizer.name = 1.0, "muon"
  muon_s = time_train_step(config, tokens)["step_s"]
  print(f"full_head with Muon: step {muon_s * 1e3:7.1f} ms  {tokens.size / muon_s:9.0f} tokens/s "
        f"({muon_s / results['full_head']['step_s']:.2f}x the AdamW step)")
  # Mixed precision: the dense layers' operands in bfloat16, float32 accumulation (AMX on CPU).
  config.optimizer.name, config.model.matmul_dtype = "adamw", "bfloat16"
  bf16_s = time_train_step(config, tokens)["step_s"]
  print(f"full_head with bfloat16 matmul operands: step {bf16_s * 1e3:7.1f} ms  "
        f"{tokens.size / bf16_s:9.0f} tokens/s ({results['full_head']['step_s'] / bf16_s:.2f}x "
        f"the float32 step's speed)")
  # The local branch beside attention (model.local_mix, configs/demo.py), float32 operands.
  config.model.matmul_dtype, config.model.local_mix = "", 3
  local_s = time_train_step(config, tokens)["step_s"]
  config.model.local_mix = 0
  print(f"full_head with model.local_mix=3: step {local_s * 1e3:7.1f} ms  "
        f"{tokens.size / local_s:9.0f} tokens/s ({local_s / results['full_head']['step_s']:.2f}x "
        f"the step without it)")
  # Reference point: the published MD4 code reaches ~41% of the measured peak at this shape with
  # a full output head, i.e. 0.41 * peak / (model FLOPs per token) tokens/s.
  reference = 0.41 * peak * 1e9 / (results["full_head"]["flops_per_step"] / tokens.size)
  print(f"tokens/s relative to the published code's reported 41%-of-peak: "
        f"{best['tokens_per_s'] / reference:.2f}x")
  return {"tokens_per_s": best["tokens_per_s"], "step_s": best["step_s"],
          "flops_per_step": best["flops_per_step"], "matmul_peak_gflops": peak,
          "peak_fraction": best["peak_fraction"], "reference_tokens_per_s": reference,
          "speedup_vs_reference": best["tokens_per_s"] / reference, "variants": results,
          "muon_step_s": muon_s, "bf16_operands_step_s": bf16_s, "local_mix_step_s": local_s,
          "peak_rss_mb": peak_rss_mb()}


def cmd_sample(args) -> dict:
  config = bench_config(args)
  method = methods.create(config, config.vocab_size)
  params = method.init(jax.random.key(0))
  logits_fn = text.network_fn(method.model, params, None, False)
  results = {}
  for cache in (False, True):
    fn = jax.jit(functools.partial(
        masked.sample, logits_fn, schedule=method.schedule, batch_size=args.batch,
        seq_len=args.seq_len, vocab_size=args.vocab, num_steps=args.steps, cache=cache,
        return_network_calls=True))
    seconds = best_time(fn, jax.random.key(2), repeats=2)
    calls = int(fn(jax.random.key(2))[1])
    results["cache" if cache else "no_cache"] = {
        "seconds": seconds, "network_calls": calls,
        "tokens_per_s": args.batch * args.seq_len / seconds}
    print(f"cache={cache!s:5s} {seconds:7.2f} s  {calls} network calls  "
          f"{args.batch * args.seq_len / seconds:8.1f} tokens/s")
  one_call = jax.jit(logits_fn)
  z = jnp.full((args.batch, args.seq_len), args.vocab, jnp.int32)
  call_s = best_time(one_call, z, jnp.ones((args.batch,)))
  print(f"one network call: {call_s * 1e3:.1f} ms; reference sampler cost "
        f"({args.steps} + 1 calls): {(args.steps + 1) * call_s:.2f} s")
  best = results["cache"]
  return {**best, "network_call_s": call_s,
          "reference_calls": args.steps + 1, "variants": results, "peak_rss_mb": peak_rss_mb()}


def cmd_ggm(args) -> dict:
  """GGM cost per sampling step against vocabulary size: one network call with the head at the
  queried position only, against the same call with a full [B, L, V] head."""
  results = {}
  for vocab in args.vocabs:
    config = bench_config(args)
    config.vocab_size, config.model_type = vocab, "ggm"
    config.model.time_conditioning = True
    method = methods.create(config, vocab)
    params = method.init(jax.random.key(0))
    x_in = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len), 0, vocab)
    x_in = x_in.at[:, 3].set(vocab)  # the queried position holds the query id
    t = jnp.full((args.batch,), 5)
    query = jax.jit(text.query_head_fn(method.model, params, None, False, 100))
    full = jax.jit(text.network_fn(method.model, params, None, False))
    query_s = best_time(query, x_in, t)
    full_s = best_time(full, x_in, t.astype(jnp.float32) / 100)
    flops = query.lower(x_in, t).compile().cost_analysis()
    flops = (flops[0] if isinstance(flops, list) else flops)["flops"]
    results[vocab] = {"call_s": query_s, "full_head_call_s": full_s, "flops_per_call": flops,
                      "head_flops": 2 * args.batch * args.width * vocab}
    print(f"V={vocab:6d}: query-head call {query_s * 1e3:8.2f} ms ({flops / 1e9:.2f} GFLOP), "
          f"full-head call {full_s * 1e3:8.2f} ms")
  beside_md4 = ggm_beside_md4(args)
  small, large = (results[v] for v in (min(args.vocabs), max(args.vocabs)))
  growth = large["call_s"] / small["call_s"]
  flop_growth = large["flops_per_call"] / small["flops_per_call"]
  print(f"time per call grows {growth:.2f}x from V={min(args.vocabs)} to V={max(args.vocabs)}; "
        f"FLOPs per call grow {flop_growth:.2f}x (the head's share)")
  return {"seconds_per_call": {str(v): r["call_s"] for v, r in results.items()},
          "time_growth": growth, "flop_growth": flop_growth,
          "variants": {str(v): r for v, r in results.items()}, "beside_md4": beside_md4,
          "peak_rss_mb": peak_rss_mb()}


def ggm_beside_md4(args) -> dict:
  """GGM (K = --sweeps) and MD4 (--steps sampling steps) at one shape (V = --vocab): seconds per
  training step, supervised positions per step, and one batch of samples with its network calls.
  """
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len), 0, args.vocab)
  results = {}
  for name in ("md4", "ggm"):
    config = bench_config(args)
    config.model_type, config.ggm.sweeps = name, args.sweeps
    config.model.time_conditioning = name == "ggm" or not args.no_time
    train = time_train_step(config, tokens)
    method = methods.create(config, config.vocab_size)
    params = method.init(jax.random.key(0))
    sample = jax.jit(method.sample_with_calls, static_argnums=2)
    seconds = best_time(sample, params, jax.random.key(2), args.batch, repeats=2)
    calls = int(sample(params, jax.random.key(2), args.batch)[1])
    # MD4 supervises every masked position (half on average); GGM one position per sequence.
    supervised = args.batch * (args.seq_len / 2 if name == "md4" else 1)
    results[name] = {"train_step_s": train["step_s"], "supervised_per_step": supervised,
                     "sample_s": seconds, "network_calls": calls}
    print(f"{name}: train step {train['step_s'] * 1e3:7.1f} ms ({supervised:.0f} supervised "
          f"positions), {args.batch} samples {seconds * 1e3:8.1f} ms in {calls} network calls")
  return results


def load_config(config_argv: list[str]) -> config_lib.ml_collections.ConfigDict:
  """The config of `--config=FILE [--config.a.b=v ...]`, parsed as main.py parses it."""
  from absl import flags
  from ml_collections import config_flags
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values)
  flag_values(["bench", *config_argv])
  if flag_values.config is None:
    raise SystemExit("bench: memory and collectives need --config=FILE")
  return flag_values.config


def compile_train_step(config) -> tuple[jax.stages.Compiled, dict]:
  """The real train step of `config` compiled on its mesh over all devices (nothing runs), with
  the abstract state it takes."""
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  method = methods.create(config, config.vocab_size)
  tx, lr = make_optimizer(config, config.training.num_steps)
  init = functools.partial(init_state, method, tx)
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.state_shardings(mesh, abstract)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract, shardings)
  tokens = jax.ShapeDtypeStruct((config.training.batch_size, config.seq_len), jnp.int32,
                                sharding=sharding.batch_sharding(mesh))
  step = jax.jit(functools.partial(train_step, method=method, tx=tx, lr=lr, config=config,
                                   rng=jax.random.key(0), mesh=mesh),
                 donate_argnums=0, out_shardings=(shardings, None))
  return step.lower(state, {"tokens": tokens}).compile(), abstract


def cmd_memory(args, config) -> dict:
  if config.model.attention == "auto":
    # The accelerator's program: auto picks splash on TPU (a flash kernel, as cuDNN's on GPU),
    # compiled here in Pallas interpret mode; XLA:CPU's own choice would keep L x L matrices.
    config.model.attention = "splash"
    print("model.attention=auto compiled as splash (TPU's choice; Pallas interpret mode here)")
  compiled, _ = compile_train_step(config)
  stats = compiled.memory_analysis()
  compiled_bytes = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                    - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  predicted = memory_budget.predict(config, jax.device_count())
  print(f"{jax.device_count()} devices, mesh (data, fsdp) = ({config.mesh.data}, "
        f"{config.mesh.fsdp}); per device: arguments {stats.argument_size_in_bytes / 1e9:.3f} GB, "
        f"temporaries {stats.temp_size_in_bytes / 1e9:.3f} GB")
  terms = ", ".join(f"{k} {predicted[k] / 1e9:.3f}" for k in memory_budget.TERMS)
  print(f"compiled {compiled_bytes / 1e9:.3f} GB per device, predicted "
        f"{predicted['total'] / 1e9:.3f} GB ({terms}): ratio "
        f"{compiled_bytes / predicted['total']:.3f}")
  return {"devices": jax.device_count(), "mesh": [config.mesh.data, config.mesh.fsdp],
          "compiled_bytes_per_device": compiled_bytes,
          "predicted_bytes_per_device": predicted["total"], "predicted": predicted,
          "ratio": compiled_bytes / predicted["total"],
          "argument_bytes": stats.argument_size_in_bytes,
          "output_bytes": stats.output_size_in_bytes, "alias_bytes": stats.alias_size_in_bytes,
          "temp_bytes": stats.temp_size_in_bytes}


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
                "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def collectives(hlo_text: str) -> list[dict]:
  """Every collective op of an HLO module: kind, result shapes and bytes (per device)."""
  ops = []
  for line in hlo_text.splitlines():
    match = _OP.search(line)
    if match is None:
      continue
    shapes = [(dtype, [int(d) for d in dims.split(",") if d])
              for dtype, dims in _ARRAY.findall(match.group(1)) if dtype in _DTYPE_BYTES]
    ops.append({"kind": match.group(2), "shapes": [f"{d}{s}" for d, s in shapes],
                "bytes": sum(_DTYPE_BYTES[d] * int(np.prod(s)) for d, s in shapes)})
  return ops


def cmd_collectives(args, config) -> dict:
  compiled, abstract = compile_train_step(config)
  ops = collectives(compiled.as_text())
  largest = max(int(np.prod(x.shape)) * x.dtype.itemsize
                for x in jax.tree.leaves(abstract["params"]))
  for op in sorted(ops, key=lambda op: -op["bytes"])[:args.top]:
    print(f"{op['kind']:18s} {op['bytes']:12d} bytes  {' '.join(op['shapes'])}")
  kinds = sorted({op["kind"] for op in ops})
  print(f"{len(ops)} collectives ({', '.join(kinds)}); largest parameter {largest} bytes; "
        f"largest collective {max((op['bytes'] for op in ops), default=0)} bytes")
  return {"devices": jax.device_count(), "mesh": [config.mesh.data, config.mesh.fsdp],
          "largest_param_bytes": largest, "collectives": ops}


def set_device_count(devices: int) -> None:
  """Simulates `devices` CPU devices; must run before JAX creates its backend."""
  flags = os.environ.get("XLA_FLAGS", "")
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("what", choices=["train", "sample", "ggm", "memory", "collectives"])
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--vocab", type=int, default=27)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=256)
  parser.add_argument("--vocabs", type=int, nargs="+", default=[27, 50257],
                      help="ggm: vocabulary sizes to compare")
  parser.add_argument("--sweeps", type=int, default=2, help="ggm: K, sweeps of its sampler")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--peak_n", type=int, default=2048,
                      help="train: matrix size of the peak measurement (8192 on accelerators)")
  parser.add_argument("--no_time", action="store_true", help="no time conditioning")
  parser.add_argument("--head_fraction", type=float, default=0.6,
                      help="masked_head variant: head capacity as a fraction of B * L")
  parser.add_argument("--devices", type=int, default=0,
                      help="memory, collectives: simulated CPU devices (0: the real ones)")
  parser.add_argument("--top", type=int, default=12, help="collectives: how many to print")
  args, config_argv = parser.parse_known_args()
  if args.what in ("memory", "collectives"):
    if args.devices:
      set_device_count(args.devices)  # JAX has no backend yet: nothing has asked for devices
    config = load_config(config_argv)
    result = {"memory": cmd_memory, "collectives": cmd_collectives}[args.what](args, config)
  elif config_argv:
    parser.error(f"unrecognized arguments: {' '.join(config_argv)}")
  else:
    result = {"train": cmd_train, "sample": cmd_sample, "ggm": cmd_ggm}[args.what](args)
  result = {"benchmark": args.what, "args": vars(args), "backend": jax.default_backend(),
            "allocator": tcmalloc.allocator(), **result}
  print(json.dumps(result, default=lambda x: float(np.asarray(x))))


if __name__ == "__main__":
  tcmalloc.reexec()
  main()
