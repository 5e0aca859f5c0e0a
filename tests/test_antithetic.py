"""The antithetic times of the NELBO: stratified over the batch and over every device's rows."""

import jax
import numpy as np
import pytest

from md4.diffusion.masked import antithetic_times


def strata(t: np.ndarray, u: float, n: int) -> np.ndarray:
  """The stratum floor(n ((t - u) mod 1)) of each time, for n equal strata of [0, 1)."""
  return np.floor(np.mod(t - u + 1e-6, 1.0) * n).astype(int)


@pytest.mark.parametrize("batch", [8, 16, 64, 512])
def test_every_contiguous_block_is_stratified(batch):
  rng = jax.random.key(3)
  u = float(jax.random.uniform(rng, ()))
  t = np.asarray(antithetic_times(rng, batch))
  assert np.array_equal(np.sort(strata(t, u, batch)), np.arange(batch))  # one time per 1/B
  for blocks in (2, 4, 8):  # 8 devices and fewer, each with B / blocks consecutive rows
    size = batch // blocks
    for block in t.reshape(blocks, size):
      assert np.array_equal(np.sort(strata(block, u, size)), np.arange(size))


def test_not_a_power_of_two_keeps_the_stratified_set():
  rng = jax.random.key(0)
  u = float(jax.random.uniform(rng, ()))
  t = np.asarray(antithetic_times(rng, 12))
  assert np.array_equal(np.sort(strata(t, u, 12)), np.arange(12))
  # The first half still spreads over the whole range: one time in each sixth.
  assert np.array_equal(np.sort(strata(t[:6], u, 6)), np.arange(6))


def test_consecutive_times_no_longer_form_a_band():
  t = np.asarray(antithetic_times(jax.random.key(1), 64)).reshape(8, 8)
  assert np.all(t.max(axis=1) - t.min(axis=1) > 0.5)  # each device's times span [0, 1)
