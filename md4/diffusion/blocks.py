"""Semi-autoregressive block decoding (as in MDLM and BD3-LM) around any masked-diffusion sampler,
and generation longer than the network's window by a sliding window.

The output of `length` tokens is decoded in blocks of `block_size`, left to right. Block j
(positions [j b, (j + 1) b)) is drawn by the wrapped sampler as a sequence of its own length b:
its network call places the block into a window of the network's `seq_len` positions, holding the
blocks decoded so far (as known tokens), the user's known tokens, and masks for the blocks still
to come. The window is [0, seq_len) until the block ends past seq_len; from then on it ends at the
block, so the last seq_len - b tokens are the context (a sliding window). With the exact
conditionals and an exact inner sampler, block j is an exact draw of p(block j | window context);
for length = seq_len that is p(block j | blocks < j) and the whole sequence is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from md4.diffusion.masked import LogitsFn, initial_state

Array = jnp.ndarray
# sampler(logits_fn, rng, *, batch_size, seq_len, known, known_mask) -> (int[B, seq_len], calls),
# e.g. functools.partial(masked.sample, schedule=..., vocab_size=V, num_steps=S,
# return_network_calls=True).
Sampler = Callable[..., tuple[Array, Array]]


def check_blocks(seq_len: int, length: int, block_size: int) -> None:
  """Raises ValueError (one line) for a block layout the decoder cannot take."""
  if not 0 < block_size <= seq_len:
    raise ValueError(f"block size {block_size} must be in 1..{seq_len} (the network's seq_len)")
  if length < seq_len or length % block_size:
    raise ValueError(f"the length {length} must be at least seq_len {seq_len} and a multiple of "
                     f"the block size {block_size}")


def sample(sampler: Sampler, logits_fn: LogitsFn, rng: Array, *, batch_size: int, seq_len: int,
           vocab_size: int, block_size: int, length: int | None = None,
           known: Array | None = None, known_mask: Array | None = None,
           return_network_calls: bool = False) -> Array | tuple[Array, Array]:
  """Block-by-block decoding of int[B, length] (default length = seq_len) with `sampler`.

  The call count is the sum of the inner sampler's over the blocks.
  """
  length = seq_len if length is None else length
  check_blocks(seq_len, length, block_size)
  mask_id = vocab_size
  out = initial_state(batch_size, length, mask_id, known, known_mask)
  given = out != mask_id

  def block(j, carry):
    out, calls = carry
    begin = j * block_size
    start = jnp.maximum(0, begin + block_size - seq_len)  # the window's first position
    window = jax.lax.dynamic_slice_in_dim(out, start, seq_len, axis=1)
    offset = begin - start

    def block_logits(z_block: Array, t: Array) -> Array:
      full = jax.lax.dynamic_update_slice_in_dim(window, z_block, offset, axis=1)
      return jax.lax.dynamic_slice_in_dim(logits_fn(full, t), offset, block_size, axis=1)

    z_block, block_calls = sampler(
        block_logits, jax.random.fold_in(rng, j), batch_size=batch_size, seq_len=block_size,
        known=jax.lax.dynamic_slice_in_dim(out, begin, block_size, axis=1),
        known_mask=jax.lax.dynamic_slice_in_dim(given, begin, block_size, axis=1))
    out = jax.lax.dynamic_update_slice_in_dim(out, z_block.astype(out.dtype), begin, axis=1)
    return out, calls + block_calls

  out, calls = jax.lax.fori_loop(0, length // block_size, block,
                                 (out, jnp.array(0, jnp.int32)))
  return (out, calls) if return_network_calls else out
