"""Exact 'oracle' denoisers for tiny problems with a known distribution p over all V^L sequences."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np


def random_distribution(seed: int, vocab_size: int, seq_len: int, concentration: float = 0.5
                        ) -> np.ndarray:
  """A random p over V^L sequences, as an array of shape [V] * L summing to 1."""
  rng = np.random.default_rng(seed)
  return rng.dirichlet(np.full(vocab_size**seq_len, concentration)).reshape((vocab_size,) * seq_len)


def all_sequences(vocab_size: int, seq_len: int) -> np.ndarray:
  """Every sequence in lexicographic order: int[V^L, L] (row k matches p.reshape(-1)[k])."""
  return np.array(list(itertools.product(range(vocab_size), repeat=seq_len)), dtype=np.int32)


def state_index(z: jnp.ndarray, base: int) -> jnp.ndarray:
  """Lexicographic index of each row of z: int[..., L] with ids in 0..base-1."""
  powers = base ** jnp.arange(z.shape[-1] - 1, -1, -1)
  return jnp.sum(z * powers, axis=-1)


def masked_conditional_table(p: np.ndarray) -> np.ndarray:
  """log p(x_n = v | unmasked tokens of z) for every partially masked z.

  Returns float[(V+1)^L, L, V] indexed by `state_index(z, V + 1)`; the mask id is V.
  Rows for unmasked positions hold the same conditional (they are never read by the losses).
  """
  vocab_size, seq_len = p.shape[0], p.ndim
  seqs = all_sequences(vocab_size, seq_len)
  probs = p.reshape(-1)
  table = np.zeros(((vocab_size + 1) ** seq_len, seq_len, vocab_size))
  for k, z in enumerate(itertools.product(range(vocab_size + 1), repeat=seq_len)):
    z = np.array(z)
    consistent = np.all((seqs == z) | (z == vocab_size), axis=1)
    weights = probs * consistent
    for n in range(seq_len):
      marginal = np.bincount(seqs[:, n], weights=weights, minlength=vocab_size)
      table[k, n] = np.log(np.maximum(marginal / marginal.sum(), 1e-30))
  return table.astype(np.float32)


def masked_oracle(p: np.ndarray):
  """logits_fn(z, t, head_index=None, head_reduce=None): the exact conditionals (independent of
  t); head_index and head_reduce as md4.networks.transformer.Transformer takes them."""
  table = jnp.asarray(masked_conditional_table(p))
  base = p.shape[0] + 1

  def logits_fn(z, t, head_index=None, head_reduce=None):
    del t
    logits = table[state_index(z, base)]  # [B, L, V]

    def head(index):  # index: int[G, C] into G groups of consecutive rows, or None
      if index is None:
        return logits
      groups = logits.reshape(index.shape[0], -1, logits.shape[-1])
      return jnp.take_along_axis(groups, index[..., None], axis=1)

    return head(head_index) if head_reduce is None else head_reduce(head)

  return logits_fn


def total_variation(samples: np.ndarray, p: np.ndarray) -> float:
  """TV distance between the empirical law of samples: int[N, L] and p: [V] * L."""
  vocab_size = p.shape[0]
  index = np.asarray(state_index(jnp.asarray(samples), vocab_size))
  empirical = np.bincount(index, minlength=p.size) / len(index)
  return 0.5 * float(np.abs(empirical - p.reshape(-1)).sum())


def expected_tv(p: np.ndarray, num_samples: int) -> float:
  """Approximate E[TV] of an empirical law from num_samples draws of p (normal approximation)."""
  q = p.reshape(-1)
  return 0.5 * float(np.sum(np.sqrt(2 * q * (1 - q) / (np.pi * num_samples))))
