"""x @ W for dense layers, with a weight gradient that XLA:CPU runs on its fast matmul path, and
optional bfloat16 operands with float32 accumulation.

The weight gradient x^T dy contracts the token axes of both operands, so one of them has to be
transposed in memory first. JAX's own transpose rule leaves XLA:CPU with a fallback matmul at
about a quarter of the library's speed (49 vs 214 GFLOP/s on one core for [4096, 256] x
[4096, 1408]); writing x^T dy makes XLA transpose x, which for the MLP's output layer is a
strided [tokens, 704] copy fused with the SiLU gate, 20 ms per layer on one core, ~3x the
product itself. Here the operand with fewer features is the one transposed (dW, or dW^T and
then the small [K, N] result flipped). The values are the same sums of products.

`operand_dtype=bfloat16` casts both operands of every product (forward, dx and dW) to bfloat16
and accumulates in float32, the outputs keeping the input's dtype: mixed precision as TPUs run
float32 matmuls by default. On CPUs with AMX (Sapphire Rapids and later) XLA:CPU's library runs
these products about 3x faster than float32 ones. Its fast path takes x^T dy only with two or
more token axes, so a 2-D x gets a leading axis of one.

`out_dtype=float32` returns the float32 accumulator itself instead of rounding it to x's dtype:
the output head of a bfloat16 model uses it, so that its logits carry float32 precision.

`bias` is added to the accumulator, and its gradient summed (in float32) from the same
`operand_dtype` copy of dy that dx and dW use: dy then has a single consumer, so XLA fuses the
loss's elementwise backward into that cast and never stores a float32 copy of a [tokens, 50k]
head gradient (the bias gradient is rounded as the kernel's is).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether this machine's CPU multiplies bfloat16 matrices in AMX tiles (Linux; else False).

  Where it does, bfloat16 operands make XLA:CPU's dense products ~3x faster; CPUs without it
  (AVX-512 BF16 only, or none) are unmeasured here, so configs keep float32 on them.
  """
  try:
    with open(cpuinfo) as f:
      return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
  except OSError:
    return False


def _contract_last(a: Array, b: Array, b_axis: int, out_dtype: Any = None) -> Array:
  """a[..., K] contracted with axis `b_axis` of the 2-D b."""
  return lax.dot_general(a, b, (((a.ndim - 1,), (b_axis,)), ((), ())),
                         preferred_element_type=out_dtype)


def matmul(x: Array, w: Array, operand_dtype: Any = None, out_dtype: Any = None,
           bias: Array | None = None) -> Array:
  """x[..., K] @ w[K, N] (+ bias[N]) -> [..., N] in `out_dtype` (default x's dtype); operands in
  `operand_dtype` if given, accumulated in float32."""
  out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
  if out_dtype != x.dtype and operand_dtype is None:
    operand_dtype = x.dtype
  if (operand_dtype is not None and jnp.dtype(operand_dtype) == jnp.float32
      and x.dtype == w.dtype == out_dtype == jnp.float32):
    operand_dtype = None  # plain float32: the fast-gradient path below
  bias_dtype = None if bias is None else bias.dtype
  return _matmul(x, w, bias, operand_dtype, (w.dtype, x.dtype, out_dtype, bias_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _matmul(x: Array, w: Array, bias: Array | None, operand_dtype: Any, dtypes: tuple) -> Array:
  return _matmul_fwd(x, w, bias, operand_dtype, dtypes)[0]


def _matmul_fwd(x: Array, w: Array, bias: Array | None, operand_dtype: Any,
                dtypes: tuple) -> tuple[Array, tuple[Array, Array]]:
  if operand_dtype is None:
    y = _contract_last(x, w, 0)
  else:
    x, w = x.astype(operand_dtype), w.astype(operand_dtype)
    y = _contract_last(x, w, 0, jnp.float32)
  if bias is not None:
    y = y + bias
  return y.astype(dtypes[2]), (x, w)


def _matmul_bwd(operand_dtype: Any, dtypes: tuple, residuals: tuple[Array, Array],
                dy: Array) -> tuple[Array, Array, Array | None]:
  x, w = residuals  # in operand_dtype when it is given
  w_dtype, x_dtype, _, bias_dtype = dtypes
  tokens = tuple(range(x.ndim - 1))
  if operand_dtype is not None:
    dy = dy.astype(operand_dtype)
  d_bias = None if bias_dtype is None else jnp.sum(
      dy.astype(jnp.float32), axis=tuple(range(dy.ndim - 1))).astype(bias_dtype)
  if operand_dtype is not None:
    dx = _contract_last(dy, w, 1, jnp.float32)
    if x.ndim == 2:
      x, dy, tokens = x[None], dy[None], (0, 1)
    dw = lax.dot_general(x, dy, ((tokens, tokens), ((), ())), preferred_element_type=jnp.float32)
  else:
    dx = _contract_last(dy, w, 1)
    if x.shape[-1] > dy.shape[-1]:
      dw = lax.dot_general(dy, x, ((tokens, tokens), ((), ()))).T  # transposes dy: [N, tokens]
    else:
      dw = lax.dot_general(x, dy, ((tokens, tokens), ((), ())))  # transposes x: [K, tokens]
  return dx.astype(x_dtype), dw.astype(w_dtype), d_bias


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                      preferred_element_type=None, *, operand_dtype: Any = None) -> Array:
  """A `dot_general` for flax.linen.Dense: `matmul` for its lhs-last-axis x rhs-first-axis form.

  Bind `operand_dtype` with functools.partial for bfloat16 operands (see the module docstring).
  """
  if (dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or precision is not None
      or preferred_element_type is not None):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  return matmul(lhs, rhs, operand_dtype)
