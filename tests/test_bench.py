"""The benchmark's FLOP count: closed form, and agreement with XLA's count of the real step."""

import argparse

import jax
import pytest

from md4 import methods
from md4.tools import bench


def bench_args(**kw) -> argparse.Namespace:
  args = dict(layers=2, width=64, heads=4, seq_len=64, vocab=27, batch=4, steps=1,
              dtype="float32", no_time=True)
  return argparse.Namespace(**{**args, **kw})


def test_model_flops_closed_form():
  args = bench_args()
  config = bench.bench_config(args)
  params = jax.eval_shape(methods.create(config, args.vocab).init, jax.random.key(0))
  hidden = 32 * -(-2 * 4 * 64 // (3 * 32))  # the transformer's SwiGLU width for mlp_ratio 4
  kernels = 2 * (4 * 64 * 64 + 3 * 64 * hidden) + 64 * 27
  expected = 3 * (2 * kernels + 4 * 2 * 64 * 64)
  assert bench.model_flops_per_token(params, config) == expected
  # Time conditioning adds per-example layers only: the per-token count does not change.
  timed = bench.bench_config(bench_args(no_time=False))
  timed_params = jax.eval_shape(methods.create(timed, args.vocab).init, jax.random.key(0))
  assert bench.model_flops_per_token(timed_params, timed) == expected


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_model_flops_match_xla_count():
  args = bench_args(layers=2, width=128, seq_len=128, batch=8)
  config = bench.bench_config(args)
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len), 0, args.vocab)
  r = bench.time_train_step(config, tokens)
  # On CPU XLA counts every multiply-add plus elementwise work: a little above the model count.
  assert 1.0 <= r["xla_flops_per_step"] / r["flops_per_step"] < 1.08, r
