"""Exact quantities for GenMD4 on tiny problems: the posterior denoiser, the expected NELBO by
enumeration and quadrature, and the exact gap between the oracle NELBO and -log p(x)."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from md4.diffusion.schedules import EPS
from tests import oracle


def posterior_oracle(p: np.ndarray, w: jnp.ndarray, eps: float = EPS):
  """logits_fn(z, t) returning log P(x_n = v | z_t) under value-dependent masking.

  A sequence x consistent with z is weighted by p(x) prod_{masked n} (1 - alpha_{x_n}(t)) (the
  factors of the unmasked positions are the same for every consistent x). Jittable.
  """
  vocab_size, seq_len = p.shape[0], p.ndim
  seqs = jnp.asarray(oracle.all_sequences(vocab_size, seq_len))  # [K, L]
  log_p = jnp.log(jnp.asarray(p.reshape(-1), jnp.float32))  # [K]
  onehot = jax.nn.one_hot(seqs, vocab_size)  # [K, L, V]

  def logits_fn(z, t):
    masked = z == vocab_size  # [B, L]
    consistent = jnp.all(masked[:, None] | (seqs[None] == z[:, None]), axis=-1)  # [B, K]
    log_masked = math.log1p(-eps) + w[seqs][None] * jnp.log(t)[:, None, None]  # [B, K, L]
    log_weight = log_p + jnp.sum(jnp.where(masked[:, None], log_masked, 0.0), axis=-1)
    weight = jax.nn.softmax(jnp.where(consistent, log_weight, -jnp.inf), axis=-1)  # [B, K]
    marginal = jnp.einsum("bk,knv->bnv", weight, onehot)
    return jnp.log(jnp.maximum(marginal, 1e-30))

  return logits_fn


def mask_patterns(seq_len: int) -> np.ndarray:
  """All 2^L masks: bool[2^L, L] (True = masked)."""
  return np.array(list(itertools.product([False, True], repeat=seq_len)))


# Panels of the quadrature in s = log t; the integrand decays like t^{min w}, so what lies below
# e^-70 is below e^{-70 min w} (< 1e-9 for min w >= 0.3).
LOG_T_PANELS = (-70.0, -40.0, -20.0, -10.0, -5.0, -2.0, 0.0)


def expected_nelbo(logits_fn, x: np.ndarray, w: jnp.ndarray, *, vocab_size: int,
                   eps: float = EPS, nodes: int = 24) -> jnp.ndarray:
  """E_{t, z_t}[NELBO(x)] exactly: every mask pattern, composite Gauss-Legendre in s = log t
  over (0, 1], plus the prior term.

  Written independently of genmd4.loss; differentiable w.r.t. w. With dt = t ds the (1/t) of
  the integrand cancels and what is left is smooth in s.
  """
  seq_len = len(x)
  masks = jnp.asarray(mask_patterns(seq_len))  # [M, L]
  unit_nodes, unit_weights = np.polynomial.legendre.leggauss(nodes)
  lo, hi = np.array(LOG_T_PANELS[:-1])[:, None], np.array(LOG_T_PANELS[1:])[:, None]
  s = ((hi - lo) / 2 * unit_nodes + (hi + lo) / 2).reshape(-1)  # [Q]
  weights_s = jnp.asarray(((hi - lo) / 2 * unit_weights).reshape(-1), jnp.float32)
  t = jnp.asarray(np.exp(s), jnp.float32)
  z = jnp.where(masks, vocab_size, jnp.asarray(x))  # [M, L]
  num_q, num_m = t.shape[0], masks.shape[0]
  z_all = jnp.tile(z, (num_q, 1))  # [Q * M, L]
  t_all = jnp.repeat(t, num_m)
  logits = logits_fn(z_all, t_all).reshape(num_q, num_m, seq_len, vocab_size)
  log_mu = jax.nn.log_softmax(logits, axis=-1)
  w_x = w[jnp.asarray(x)]  # [L]
  log_mu_x = log_mu[..., jnp.arange(seq_len), jnp.asarray(x)]  # [Q, M, L]
  per_position = -w_x * (log_mu_x + 1.0) + jnp.sum(w * jnp.exp(log_mu), axis=-1)
  t_times_integrand = jnp.sum(jnp.where(masks, per_position, 0.0), axis=-1)  # [Q, M]
  masked_prob = (1.0 - eps) * jnp.exp(jnp.asarray(s, jnp.float32)[:, None] * w_x)  # [Q, L]
  q = jnp.prod(jnp.where(masks, masked_prob[:, None], 1.0 - masked_prob[:, None]), axis=-1)
  integral = jnp.sum(weights_s * jnp.sum(q * t_times_integrand, axis=-1))
  return integral + seq_len * eps * math.log(vocab_size)


def _forward_matrix(p: np.ndarray, w: np.ndarray, t: float, eps: float) -> np.ndarray:
  """q(z | x, t) for every sequence x (rows, lexicographic) and state z (columns, base V+1)."""
  vocab_size, seq_len = p.shape[0], p.ndim
  seqs = oracle.all_sequences(vocab_size, seq_len)
  keep = 1.0 - (1.0 - eps) * t ** np.asarray(w, np.float64)  # [V]
  matrix = np.zeros((len(seqs), (vocab_size + 1) ** seq_len))
  powers = (vocab_size + 1) ** np.arange(seq_len - 1, -1, -1)
  for k, seq in enumerate(seqs):
    for masks in mask_patterns(seq_len):
      z = np.where(masks, vocab_size, seq)
      matrix[k, z @ powers] = np.prod(np.where(masks, 1.0 - keep[seq], keep[seq]))
  return matrix


def oracle_gap(p: np.ndarray, x: tuple, w: np.ndarray, *, t1: float = 0.0,
               eps: float = EPS) -> float:
  """E[NELBO(x)] with the posterior oracle minus -log p(x), exactly (float64).

  The bound is tight for the true reverse process started from the true q(z_1) and ending with
  the true q(x | z_t1). GenMD4 replaces the first by a prior (KL eps log V per token); a bound
  cut at t1 > 0 (GenMD4 before it integrated down to 0) replaces the second by uniform coding of
  the tokens still masked, so
      gap = L eps log V - KL(q(z_1 | x) || q(z_1))
            + E_{q(z_t1 | x)}[#masked(z_t1) log V + log q(x | z_t1)]
  (the last line is 0 for t1 = 0).
  """
  vocab_size, seq_len = p.shape[0], p.ndim
  probs = p.reshape(-1).astype(np.float64)
  k = int(np.ravel_multi_index(x, p.shape))
  log_v = math.log(vocab_size)

  def terms(t):
    matrix = _forward_matrix(p, w, t, eps)
    given_x = matrix[k]
    marginal = probs @ matrix
    support = given_x > 0
    return given_x[support], marginal[support], np.nonzero(support)[0]

  given_x, marginal, _ = terms(1.0)
  kl_prior = np.sum(given_x * np.log(given_x / marginal))
  given_x, marginal, states = terms(t1)
  digits = np.stack(np.unravel_index(states, (vocab_size + 1,) * seq_len), axis=-1)
  num_masked = np.sum(digits == vocab_size, axis=-1)
  posterior = probs[k] * given_x / marginal
  reconstruction = np.sum(given_x * (num_masked * log_v + np.log(posterior)))
  return float(seq_len * eps * log_v - kl_prior + reconstruction)
