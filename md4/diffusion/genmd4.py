"""GenMD4: masked diffusion with a learnable, state-dependent schedule (docs/methods.md §2).

Token v stays clean until time t with probability alpha_v(t) = 1 - (1 - eps) t^{w_v}, with one
exponent w_v = softplus(w_raw_v) per vocabulary item. The mask id is V and
`logits_fn(z, t)` maps z: int[B, L] in 0..V and t: float[B] to float[B, L, V] logits.

The network's mu_n(v) models the posterior P(x_n = v | z_t) of a masked token. Because masking
depends on the value, that posterior weighs each value by its masking probability
1 - alpha_v(t); the matching reverse (unmasking) rate of value v is
-alpha_v'(t) / (1 - alpha_v(t)) * mu_n(v) = (w_v / t) * mu_n(v), in which eps cancels exactly.

NELBO (nats per sequence), the terms of the continuous-time bound (docs/bounds.md):
  * prior at t = 1: each token is still clean with probability alpha_v(1) = eps whatever w is;
    against a prior that keeps a token uniform over V with probability eps (else masked) the KL
    is exactly eps * log V per token (`masked.boundary_nats`, shared with MD4);
  * diffusion on (0, 1]: the path KL of the true (given x) and model reverse rates,
        int_0^1 sum_{masked n} (1/t) (-w_{x_n} (log mu_n(x_n) + 1) + sum_v w_v mu_n(v)) dt;
  * reconstruction at t = 0: none, since alpha_v(0) = 1 (no token is masked at t = 0).
The integral reaches t = 0 by importance sampling (`sample_times`): t has density
q(t) = (1 + beta t^(beta - 1)) / 2, half uniform and half the power law beta t^(beta - 1), and
the integrand is weighted by 1 / q(t). A token with exponent w is masked with probability ~t^w,
so the power-law half keeps the variance finite when beta < w (int t^(w - beta - 1) dt) and
the uniform half keeps large exponents as cheap as uniform times; beta = min(1, min_v w_v / 2)
without gradient (any fixed beta is unbiased).
With the exact posterior as mu, the NELBO is -log p(x) up to the prior's O(eps) term.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from md4.diffusion.categorical import adjust_logits, sample_categorical
from md4.diffusion.masked import LogitsFn, antithetic_times, boundary_nats, initial_state
from md4.diffusion.schedules import EPS

# beta is floored here; u is floored at 2^-24 (antithetic float32 u are multiples of 2^-23), so
# that u = 0 gives a finite log t and weight.
BETA_MIN = 0.01
U_FLOOR = 2.0**-24

Array = jnp.ndarray


def init_w_raw(vocab_size: int) -> Array:
  """Raw exponents float[V] with softplus(w_raw) = 1 (the linear schedule for every token)."""
  return jnp.full((vocab_size,), math.log(math.expm1(1.0)), jnp.float32)


def alpha(t: Array, w: Array, eps: float = EPS) -> Array:
  """alpha_v(t) = 1 - (1 - eps) t^{w_v}: float[..., V] for t: float[...] and w: float[V]."""
  return 1.0 - (1.0 - eps) * jnp.asarray(t)[..., None] ** w


def _log_mask_probs(log_t: Array, w_x: Array, eps: float) -> tuple[Array, Array]:
  """(log alpha, log(1 - alpha)) of each token, for log t: float[B] and w_x: float[B, L]."""
  log_masked = math.log1p(-eps) + w_x * log_t[:, None]
  return jnp.log(-jnp.expm1(log_masked)), log_masked


def time_exponent(w: Array) -> Array:
  """beta = min(1, min_v w_v / 2), floored at BETA_MIN, without gradient: float."""
  return jax.lax.stop_gradient(jnp.clip(0.5 * jnp.min(w), BETA_MIN, 1.0))


def sample_times(u: Array, beta: Array) -> tuple[Array, Array]:
  """Times with density q(t) = (1 + beta t^(beta - 1)) / 2 from u: float[B] in [0, 1).

  u < 1/2 maps to the power law, t = (2u)^(1 / beta); u >= 1/2 to the uniform t = 2u - 1 (so
  antithetic u put half of the batch in each). Returns (log t, 1 / (t q(t))), both float[B]
  and finite (u is floored at U_FLOOR).
  """
  lower = u < 0.5
  v = jnp.maximum(jnp.where(lower, 2.0 * u, 2.0 * u - 1.0), U_FLOOR)
  log_t = jnp.where(lower, jnp.log(v) / beta, jnp.log(v))
  return log_t, 2.0 / (jnp.exp(log_t) + beta * jnp.exp(beta * log_t))


def loss(logits_fn: LogitsFn, x: Array, rng: Array, w: Array, *, vocab_size: int,
         eps: float = EPS) -> tuple[Array, Array]:
  """RLOO surrogate and NELBO estimate, both in nats per sequence: (float[B], float[B]).

  Two independent masks z1, z2 are drawn at the same t (one network call on the 2B inputs).
  With their NELBO estimates L1, L2 and log-probabilities log q1, log q2 (which depend on w),
      surrogate = (L1 + L2) / 2 + stop_grad(L1 - L2) (log q1 - log q2) / 2,
      nelbo = (L1 + L2) / 2.
  Minimise the surrogate: its gradient w.r.t. w (and w_raw) is an unbiased estimate of the
  gradient of the expected NELBO (pathwise term plus a score-function term that uses the other
  mask as a leave-one-out baseline); w.r.t. the network it is the ordinary NELBO gradient. Its
  value is not the NELBO: report `nelbo`.

  Args:
    logits_fn: network, (z: int[B, L], t: float[B]) -> float[B, L, V].
    x: clean tokens int[B, L] in 0..V-1.
    rng: PRNG key.
    w: exponents float[V] (softplus of the trainable raw parameters).
    vocab_size: V; the mask id is V.
    eps: alpha_v(1) = eps.
  """
  time_rng, mask_rng = jax.random.split(rng)
  batch_size, seq_len = x.shape
  log_t, weight = sample_times(antithetic_times(time_rng, batch_size), time_exponent(w))
  w_x = w[x]  # float[B, L]
  log_keep, log_masked = _log_mask_probs(log_t, w_x, eps)
  keep = jax.random.uniform(mask_rng, (2, batch_size, seq_len)) < jnp.exp(log_keep)
  log_q = jnp.sum(jnp.where(keep, log_keep, log_masked), axis=-1)  # float[2, B]

  z = jnp.where(keep, x, vocab_size).reshape(2 * batch_size, seq_len)
  logits = logits_fn(z, jnp.tile(jnp.exp(log_t), 2)).astype(jnp.float32)
  log_mu = jax.nn.log_softmax(logits, axis=-1).reshape(2, batch_size, seq_len, vocab_size)
  log_mu_x = jnp.take_along_axis(log_mu, jnp.broadcast_to(x, (2,) + x.shape)[..., None],
                                 axis=-1)[..., 0]
  # float[2, B, L]: the per-position integrand times t.
  integrand = -w_x * (log_mu_x + 1.0) + jnp.sum(w * jnp.exp(log_mu), axis=-1)
  diffusion = weight * jnp.sum(jnp.where(keep, 0.0, integrand), axis=-1)  # float[2, B]
  boundary = boundary_nats(seq_len, eps, 0.0, vocab_size)  # prior eps log V; no reconstruction
  l1, l2 = diffusion + boundary
  nelbo = 0.5 * (l1 + l2)
  surrogate = nelbo + 0.5 * jax.lax.stop_gradient(l1 - l2) * (log_q[0] - log_q[1])
  return surrogate, nelbo


def sample(logits_fn: LogitsFn, rng: Array, w: Array, *, batch_size: int, seq_len: int,
           vocab_size: int, num_steps: int, top_p: float | None = None,
           top_k: int | None = None, temperature: float = 1.0, known: Array | None = None,
           known_mask: Array | None = None,
           return_network_calls: bool = False) -> Array | tuple[Array, Array]:
  """Ancestral sampler on the uniform grid 1 = t_0 > ... > t_S = 0: int[B, L].

  Given z_t and the posterior mu_n(v) = P(x_n = v | z_t) of a masked position, the exact
  one-position reverse step is P(z_s = v | z_t) = mu_n(v) (alpha_v(s) - alpha_v(t)) /
  (1 - alpha_v(t)) = mu_n(v) (1 - (s / t)^{w_v}), the rest staying masked. So a candidate v is
  drawn from mu (after temperature / top-k / top-p) and accepted with probability
  1 - (s / t)^{w_v}; mu needs no reweighting because it is already the posterior under
  value-dependent masking. The last step (s = 0) accepts every candidate, so no mask is left.
  Known positions are set before the first step and never change. The network is called at
  every step (it depends on t).
  """
  times = jnp.linspace(1.0, 0.0, num_steps + 1)
  mask_id = vocab_size
  z = initial_state(batch_size, seq_len, mask_id, known, known_mask)

  def step(i, z):
    t, s = times[i], times[i + 1]
    logits = adjust_logits(logits_fn(z, jnp.full((batch_size,), t)), temperature=temperature,
                           top_p=top_p, top_k=top_k)
    value_rng, accept_rng = jax.random.split(jax.random.fold_in(rng, i))
    value = sample_categorical(value_rng, logits)  # int[B, L]
    accept_prob = -jnp.expm1(w * jnp.log(s / t))  # float[V]; 1 when s = 0
    accept_prob = jnp.where(i == num_steps - 1, 1.0, accept_prob[value])
    reveal = (z == mask_id) & (jax.random.uniform(accept_rng, z.shape) < accept_prob)
    return jnp.where(reveal, value, z)

  z = jax.lax.fori_loop(0, num_steps, step, z)
  return (z, jnp.array(num_steps, jnp.int32)) if return_network_calls else z
