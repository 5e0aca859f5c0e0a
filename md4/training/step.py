"""The train state and one jitted optimizer step: loss, gradients (optionally accumulated),
update, EMA, and the non-finite guard."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def ema_decay(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """EMA decay, warmed up as min(decay, (1 + step) / (10 + step)) when ema_warmup is set."""
  decay = jnp.asarray(config.training.ema_decay, jnp.float32)
  if config.training.ema_warmup:
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


def train_step(state: dict, batch: dict, *, method, tx, lr, config: ml_collections.ConfigDict,
               rng: jax.Array, data_key: str = "tokens") -> tuple[dict, dict]:
  """One optimizer step (with optional gradient accumulation); skips non-finite updates.

  The step's randomness is fold_in(rng, step), so a resumed run draws the same keys.
  """
  step = state["step"]
  rng = jax.random.fold_in(rng, step)
  tokens = batch[data_key]  # int[B, L] token ids, or int[B, H, W, C] image counts
  accum = config.training.grad_accum
  grad_fn = jax.value_and_grad(method.loss, has_aux=True)

  micro_rngs = jax.random.split(rng, accum)
  if accum == 1:
    # No loop: a gradient taken inside a loop body (even of length 1) keeps convolution layouts
    # that XLA:CPU runs on a naive emitter, ~10x slower (jax-ml/jax#12868).
    (_, metrics), grads = grad_fn(state["params"], tokens, micro_rngs[0])
  else:
    def micro(carry, xs):
      micro_tokens, micro_rng = xs
      (_, metrics), grads = grad_fn(state["params"], micro_tokens, micro_rng)
      return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    micro_batches = tokens.reshape(accum, -1, *tokens.shape[1:])
    (_, metric_shapes), grad_shapes = jax.eval_shape(grad_fn, state["params"], micro_batches[0],
                                                     rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grad_shapes, metric_shapes))
    # Unrolled on CPU, for the convolution layouts above; a loop elsewhere, to bound memory.
    unroll = jax.default_backend() == "cpu"
    (grads, metrics), _ = jax.lax.scan(micro, zeros, (micro_batches, micro_rngs), unroll=unroll)
    grads, metrics = jax.tree.map(lambda g: g / accum, (grads, metrics))

  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  decay = ema_decay(config, step)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
  new_state = {"step": step + 1, "params": params, "opt_state": opt_state, "ema": ema}
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                           {**state, "step": step + 1})
  metrics = {**metrics, "grad_norm": grad_norm, "lr": lr(step),
             "nonfinite": 1 - finite.astype(jnp.int32)}
  return new_state, metrics


def init_state(method, tx, rng: jax.Array) -> dict:
  """Params, optimizer moments, EMA params and the step counter."""
  params = method.init(rng)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "ema": params}
