"""Exact enumeration of the GGM process on tiny V, L: marginals, classifiers, oracle networks.

Laws are float64 numpy arrays of shape [V] * L (axis j = token at position j); `p` is the data
distribution in the same layout (see tests/oracle.py). Process constants (pi_t, kappa_c and the
noise law u) are read from the library's GlauberProcess, so these checks test the construction,
not the constants.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np

from md4.diffusion.glauber import GlauberProcess
from tests.oracle import state_index


def keep_prob(process: GlauberProcess, t: int) -> float:
  return float(process.keep_prob(t))


def survival(process: GlauberProcess, c: int) -> float:
  return float(process.survival(c))


def noise_law(process: GlauberProcess) -> np.ndarray:
  """u: float64[V], the law of a noise token (the process's, renormalised in float64)."""
  u = np.asarray(process.noise_dist(), np.float64)
  return u / u.sum()


def kernel(keep: float, u: np.ndarray) -> np.ndarray:
  """[V, V] matrix: keep the token w.p. keep, else a noise token ~ u."""
  return keep * np.eye(len(u)) + (1.0 - keep) * u[None, :]


def apply_on_axis(law: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
  """new[.., b, ..] = sum_a law[.., a, ..] matrix[a, b] on the given axis."""
  return np.moveaxis(np.tensordot(law, matrix, axes=([axis], [0])), -1, axis)


def closed_form_marginal(p: np.ndarray, process: GlauberProcess, t: int) -> np.ndarray:
  """Law of X_t from the closed form: position j keeps x_j w.p. kappa_{c_j(t)}."""
  law = p.astype(np.float64)
  visits = np.asarray(process.completed_visits(jnp.asarray(t)))
  for j, c in enumerate(visits):
    law = apply_on_axis(law, kernel(survival(process, int(c)), noise_law(process)), j)
  return law


def chain_marginal(p: np.ndarray, process: GlauberProcess, t: int) -> np.ndarray:
  """Law of X_t by running the chain's one-step kernels for steps 0..t-1."""
  law = p.astype(np.float64)
  for s in range(t):
    law = apply_on_axis(law, kernel(keep_prob(process, s), noise_law(process)),
                        s % process.seq_len)
  return law


def step_joint(p: np.ndarray, process: GlauberProcess, t: int) -> tuple[np.ndarray, np.ndarray]:
  """Joint law of (X_t, X_{t+1}) by enumeration: (all, signal part), each float[V^L, V^L].

  signal[z, z'] = P(X_t = z, X_{t+1} = z', the visit at step t was signal).
  """
  vocab_size, seq_len = process.vocab_size, process.seq_len
  i, pi = t % seq_len, keep_prob(process, t)
  marginal = closed_form_marginal(p, process, t).reshape(-1)
  states = np.array(list(itertools.product(range(vocab_size), repeat=seq_len)))
  same = np.all(states[:, None] == states[None], axis=-1)
  others = np.delete(np.arange(seq_len), i)
  same_context = np.all(states[:, None, others] == states[None, :, others], axis=-1)
  signal = marginal[:, None] * pi * same
  noise = marginal[:, None] * (1.0 - pi) * noise_law(process)[states[None, :, i]] * same_context
  return signal + noise, signal


def context_tables(process: GlauberProcess, t: int) -> tuple[np.ndarray, np.ndarray]:
  """For every (context, a): the flat index of the state with token a at i_t, and of the input
  with the query id at i_t. Both int[V^(L-1), V]; contexts in lexicographic order."""
  vocab_size, seq_len = process.vocab_size, process.seq_len
  i = t % seq_len
  contexts = np.array(list(itertools.product(range(vocab_size), repeat=seq_len - 1)))
  contexts = contexts.reshape(len(contexts), seq_len - 1)
  states = np.stack([np.insert(contexts, i, a, axis=1) for a in range(vocab_size)], axis=1)
  queries = np.insert(contexts, i, vocab_size, axis=1)
  state_ids = np.asarray(state_index(jnp.asarray(states), vocab_size))
  query_ids = np.asarray(state_index(jnp.asarray(queries), vocab_size + 1))
  return state_ids, np.broadcast_to(query_ids[:, None], state_ids.shape)


def classifier_and_conditional(p: np.ndarray, process: GlauberProcess, t: int
                               ) -> tuple[np.ndarray, np.ndarray]:
  """(p_t, q_t), each float[V^(L-1), V] over (context, a), by direct enumeration.

  p_t(a, ctx) = P(signal | X_{t+1}^i = a, X_{t+1}^{-i} = ctx) from the joint of (X_t, X_{t+1});
  q_t(a | ctx) = P(X_t^i = a | X_t^{-i} = ctx) from the law of X_t.
  """
  joint, signal = step_joint(p, process, t)
  state_ids, _ = context_tables(process, t)
  next_law, next_signal = joint.sum(axis=0), signal.sum(axis=0)  # over X_t
  classifier = next_signal[state_ids] / next_law[state_ids]
  marginal = closed_form_marginal(p, process, t).reshape(-1)[state_ids]
  return classifier, marginal / marginal.sum(axis=1, keepdims=True)


def oracle_tables(p: np.ndarray, process: GlauberProcess) -> tuple[np.ndarray, np.ndarray]:
  """Oracle logits for every step and network input: (logit p_t, log q_t), each
  float32[T, (V+1)^L, V] indexed by (t, state_index(x_in, V + 1)); unused rows hold zeros."""
  vocab_size, seq_len = process.vocab_size, process.seq_len
  shape = (process.num_steps, (vocab_size + 1) ** seq_len, vocab_size)
  classifier_logits, log_conditional = np.zeros(shape), np.zeros(shape)
  for t in range(process.num_steps):
    classifier, conditional = classifier_and_conditional(p, process, t)
    _, query_ids = context_tables(process, t)
    classifier_logits[t, query_ids[:, 0]] = np.log(classifier) - np.log1p(-classifier)
    log_conditional[t, query_ids[:, 0]] = np.log(conditional)
  return classifier_logits.astype(np.float32), log_conditional.astype(np.float32)


def table_logits_fn(table: np.ndarray, vocab_size: int, full_rows: bool = False):
  """A jittable logits_fn(x_in, t) reading table[t, state_index(x_in, V + 1)]: float[B, V]
  (or float[B, L, V] with the same row at every position, with `full_rows`)."""
  table = jnp.asarray(table)

  def logits_fn(x_in, t):
    rows = table[t, state_index(x_in, vocab_size + 1)]
    if full_rows:
      return jnp.broadcast_to(rows[:, None], (*x_in.shape, vocab_size))
    return rows

  return logits_fn


def sampler_law(table: np.ndarray, process: GlauberProcess, known: dict[int, int] | None = None,
                renoise_known: bool = False) -> np.ndarray:
  """Exact law of `glauber.sample`'s output when the network is the logits `table`.

  Propagates the law of the sampler's state through its T steps, each resampling position i_t
  from softmax(logits) given the context. `known` ({position: token}) clamps positions as the
  infilling sampler does, with the context re-noised at every step when `renoise_known`.
  """
  vocab_size, seq_len = process.vocab_size, process.seq_len
  known = known or {}

  def clamp(law):  # marginalise the known positions out and put them back at their tokens
    for j, v in known.items():
      law = apply_on_axis(law, np.outer(np.ones(vocab_size), np.eye(vocab_size)[v]), j)
    return law

  u = noise_law(process)
  law = u
  for _ in range(seq_len - 1):
    law = np.multiply.outer(law, u)
  law = clamp(law)
  logits = table.astype(np.float64) + np.log(u)  # the sampler draws from softmax(l + log u)
  probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
  probs /= probs.sum(axis=-1, keepdims=True)
  for t in reversed(range(process.num_steps)):
    i = t % seq_len
    if i in known:
      continue
    context_law = law
    if renoise_known:  # the network sees each known token re-noised: X_t^j | x_j
      visits = np.asarray(process.completed_visits(jnp.asarray(t)))
      for j, v in known.items():
        noised = kernel(survival(process, int(visits[j])), u)[v]
        context_law = apply_on_axis(context_law, np.outer(np.ones(vocab_size), noised), j)
    state_ids, query_ids = context_tables(process, t)
    context_marginal = context_law.sum(axis=i).reshape(-1)  # [V^(L-1)]
    flat = np.zeros(vocab_size**seq_len)
    flat[state_ids] = context_marginal[:, None] * probs[t, query_ids[:, 0]]
    law = clamp(flat.reshape(law.shape))
  return law


def conditional(p: np.ndarray, known: dict[int, int]) -> np.ndarray:
  """p(x | x_j = v for j, v in known) as a law of shape [V] * L."""
  mask = np.ones(p.shape, bool)
  for j, v in known.items():
    index = [slice(None)] * p.ndim
    index[j] = np.arange(p.shape[j]) != v
    mask[tuple(index)] = False
  law = np.where(mask, p, 0.0)
  return law / law.sum()


def expected_losses(p: np.ndarray, process: GlauberProcess, table: np.ndarray
                    ) -> dict[str, float]:
  """E_{x~p, t~U{0..T-1}, X_t} of the soft ("soft" = "hard" in expectation) and "ce" losses
  of the logits `table`, by enumeration (float64)."""
  seq_len, u = process.seq_len, noise_law(process)
  logits = table.astype(np.float64)
  soft = ce = 0.0
  for t in range(process.num_steps):
    i, pi = t % seq_len, keep_prob(process, t)
    kappa = survival(process, t // seq_len)
    # Joint of (X_t^{-i}, x_i): the law of (x, X_t) with position i left clean.
    visits = np.asarray(process.completed_visits(jnp.asarray(t)))
    law = p.astype(np.float64)
    for j, c in enumerate(visits):
      if j != i:
        law = apply_on_axis(law, kernel(survival(process, int(c)), u), j)
    state_ids, query_ids = context_tables(process, t)
    joint = law.reshape(-1)[state_ids]  # [ctx, x_i]
    r = kernel(kappa, u)  # r[x_i, a]
    row = logits[t, query_ids[:, 0]]  # [ctx, a]
    log_sig, log_sig_neg = -np.logaddexp(0.0, -row), -np.logaddexp(0.0, row)
    per = -(pi * (joint @ r) * log_sig + joint.sum(1, keepdims=True)
            * (1.0 - pi) * u * log_sig_neg)
    soft += per.sum() / process.num_steps
    shifted = row + np.log(u)  # the reverse kernel is softmax(l + log u)
    log_softmax = shifted - np.logaddexp.reduce(shifted, axis=1, keepdims=True)
    ce -= np.sum((joint @ r) * log_softmax) / process.num_steps
  return {"soft": soft, "ce": ce}


def conditional_entropy(p: np.ndarray, process: GlauberProcess) -> float:
  """(1/T) sum_t H(X_t^{i_t} | X_t^{-i_t}) in nats."""
  total = 0.0
  for t in range(process.num_steps):
    state_ids, _ = context_tables(process, t)
    joint = closed_form_marginal(p, process, t).reshape(-1)[state_ids]
    cond = joint / joint.sum(axis=1, keepdims=True)
    total -= np.sum(joint * np.log(cond)) / process.num_steps
  return total


def nelbo_offsets(p: np.ndarray, process: GlauberProcess) -> tuple[np.ndarray, np.ndarray]:
  """(gap, prior) per sequence x, each float64[V^L] (flat state index), by enumeration.

  With exact reverse kernels, the path identity p(x) prod q(x_{t+1} | x_t) = p_T(x_T) prod R_t
  makes the expected NELBO of x exactly -log p(x) + gap(x), gap(x) = E_{X_T ~ q(. | x)}
  [log p_T(X_T) - log u^L(X_T)]; prior(x) = KL(q(X_T | x) || u^L), the NELBO's prior term.
  """
  vocab_size, seq_len, steps = process.vocab_size, process.seq_len, process.num_steps
  u = noise_law(process)
  log_prior = np.zeros((vocab_size,) * seq_len)
  for j in range(seq_len):
    log_prior = log_prior + np.log(u).reshape([-1 if k == j else 1 for k in range(seq_len)])
  log_p_final = np.log(closed_form_marginal(p, process, steps)).reshape(-1)
  gap, prior = np.zeros(vocab_size**seq_len), np.zeros(vocab_size**seq_len)
  for index in range(vocab_size**seq_len):
    point = np.zeros(vocab_size**seq_len)
    point[index] = 1.0
    q_final = closed_form_marginal(point.reshape(p.shape), process, steps).reshape(-1)
    gap[index] = np.sum(q_final * (log_p_final - log_prior.reshape(-1)))
    prior[index] = np.sum(q_final * (np.log(q_final) - log_prior.reshape(-1)))
  return gap, prior


def position_table_logits_fn(table: np.ndarray, vocab_size: int):
  """A jittable logits_fn(x_in, t) -> float[B, L, V] reading table[t, state_index(x_in, V + 1)],
  a table float[T, (V+1)^L, L, V] with a row per position."""
  table = jnp.asarray(table)
  return lambda x_in, t: table[t, state_index(x_in, vocab_size + 1)]


def expected_query_losses(p: np.ndarray, process: GlauberProcess, table: np.ndarray,
                          queries: int) -> dict[str, float]:
  """E over x ~ p, t ~ U{0..T-Q}, X_t and the visits at steps t..t+Q-1 of the per-visit mean
  "hard" loss (the visit simulated: signal w.p. pi_s, else a noise token ~ u) and "ce" loss
  (-log softmax(l + log u) at the token X_t^i), the network seeing X_t with the Q visited
  positions replaced by the query id; `table` as in `position_table_logits_fn`. Enumerated."""
  vocab_size, seq_len, u = process.vocab_size, process.seq_len, noise_law(process)
  states = np.array(list(itertools.product(range(vocab_size), repeat=seq_len)))  # [S, L]
  first_steps = range(process.num_steps - queries + 1)
  hard = ce = 0.0
  for t in first_steps:
    visits = np.asarray(process.completed_visits(jnp.asarray(t)))
    # P(X_t = z) = sum_x p(x) prod_j P(X_t^j = z_j | x_j): [S] over z.
    pair = np.ones((len(states), len(states)))
    for j, c in enumerate(visits):
      pair *= kernel(survival(process, int(c)), u)[states[:, None, j], states[None, :, j]]
    weight = p.reshape(-1) @ pair
    steps = [t + k for k in range(queries)]
    x_in = states.copy()
    x_in[:, [s % seq_len for s in steps]] = vocab_size
    rows = table[t, np.ravel_multi_index(x_in.T, (vocab_size + 1,) * seq_len)]  # [S, L, V]
    for s in steps:
      i, pi = s % seq_len, keep_prob(process, s)
      logits = rows[:, i].astype(np.float64)  # [S, V] over (z, b)
      signal = pi * (np.arange(vocab_size) == states[:, i:i + 1])  # the visit keeps z_i = b
      noise = (1.0 - pi) * u[None, :]  # the visit writes the noise token b
      per_z = -(signal * -np.logaddexp(0.0, -logits) + noise * -np.logaddexp(0.0, logits))
      hard += weight @ per_z.sum(axis=1) / queries
      shifted = logits + np.log(u)
      log_softmax = shifted - np.logaddexp.reduce(shifted, axis=1, keepdims=True)
      ce -= weight @ log_softmax[np.arange(len(states)), states[:, i]] / queries
  return {"hard": hard / len(first_steps), "ce": ce / len(first_steps)}
