"""The train state and one jitted optimizer step: loss, gradients (optionally accumulated),
update, EMA, and the non-finite guard."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from md4.networks import partitioning


def ema_decay(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """EMA decay, warmed up as min(decay, (1 + step) / (10 + step)) when ema_warmup is set."""
  decay = jnp.asarray(config.training.ema_decay, jnp.float32)
  if config.training.ema_warmup:
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


def batch_data(batch: dict, data_key: str | None):
  """What the method's loss takes: batch[data_key], or the whole batch when data_key is None."""
  return batch if data_key is None else batch[data_key]


def accumulated_grads(params, tokens: jax.Array, rng: jax.Array, *, method,
                      accum: int) -> tuple[dict, dict]:
  """Mean gradients and metrics of `method.loss` over `accum` micro-batches of `tokens`.

  Micro-batch i is rows i, i + accum, i + 2 accum, ... (a strided split): with the batch split
  over the devices in contiguous blocks, every micro-batch then keeps rows on every device (no
  data moves), which the sharding constraint pins under a mesh.
  """
  grad_fn = jax.value_and_grad(method.loss, has_aux=True)
  micro_rngs = jax.random.split(rng, accum)
  if accum == 1:
    # No loop: a gradient taken inside a loop body (even of length 1) keeps convolution layouts
    # that XLA:CPU runs on a naive emitter, ~10x slower (jax-ml/jax#12868).
    (_, metrics), grads = grad_fn(params, tokens, micro_rngs[0])
    return grads, metrics

  def micro(carry, xs):
    micro_tokens, micro_rng = xs
    micro_tokens = jax.tree.map(partitioning.constrain_batch, micro_tokens)
    (_, metrics), grads = grad_fn(params, micro_tokens, micro_rng)
    return jax.tree.map(jnp.add, carry, (grads, metrics)), None

  micro_batches = jax.tree.map(  # [A, B / A, ...]
      lambda a: a.reshape(-1, accum, *a.shape[1:]).swapaxes(0, 1), tokens)
  (_, metric_shapes), grad_shapes = jax.eval_shape(
      grad_fn, params, jax.tree.map(lambda a: a[0], micro_batches), rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grad_shapes, metric_shapes))
  # Unrolled on CPU, for the convolution layouts above; a loop elsewhere, to bound memory.
  unroll = jax.default_backend() == "cpu"
  (grads, metrics), _ = jax.lax.scan(micro, zeros, (micro_batches, micro_rngs), unroll=unroll)
  return jax.tree.map(lambda g: g / accum, (grads, metrics))


def mesh_context(mesh: Mesh | None):
  """The abstract mesh the networks' activation constraints read while a step is traced."""
  return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(
      mesh.abstract_mesh)


def train_step(state: dict, batch: dict, *, method, tx, lr, config: ml_collections.ConfigDict,
               rng: jax.Array, data_key: str | None = "tokens", mesh: Mesh | None = None
               ) -> tuple[dict, dict]:
  """One optimizer step (with optional gradient accumulation); skips non-finite updates.

  The step's randomness is fold_in(rng, step), so a resumed run draws the same keys. With the
  `mesh` the state and batch live on, activations are pinned to the batch split (ZeRO-3 FSDP).
  """
  step = state["step"]
  rng = jax.random.fold_in(rng, step)
  tokens = batch_data(batch, data_key)  # int[B, L] token ids, int[B, H, W, C] image counts, ...
  with mesh_context(mesh):
    grads, metrics = accumulated_grads(state["params"], tokens, rng, method=method,
                                       accum=config.training.grad_accum)

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
