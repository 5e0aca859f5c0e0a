"""The training loop, read top to bottom: set-up -> (resume) -> steps -> logs, evaluation,
samples and checkpoints."""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
from clu import parameter_overview

from md4 import config_lib
from md4.evaluation import evaluate, samples
from md4.evaluation.reference import load_reference
from md4.training import sharding
from md4.training.metric_writers import MetricWriter
from md4.training.run import Run

# Steps dispatched ahead of the host at most. Unbounded, XLA:CPU's in-process collectives
# deadlock: with 2 simulated devices, a few hundred queued steps starve its all-reduce rendezvous.
MAX_STEPS_IN_FLIGHT = 2


class NonFiniteError(RuntimeError):
  """The loss or gradient became NaN/inf; the run stops before writing a checkpoint."""


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the newest checkpoint in workdir) and returns the final state."""
  run = Run(config, workdir)
  tokenizer = getattr(run.data, "tokenizer", None)
  reference = load_reference(config, tokenizer) if config.sampling.every else None
  t = config.training
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  config_lib.save(config, workdir)
  state, start = run.restore_or_init()
  parameter_overview.log_parameter_overview(state["params"], include_stats=False, msg="parameters")
  batch_shape = next(iter(run.data.eval_batches()))[run.data_key].shape[1:]
  tokens_per_step = t.batch_size * int(np.prod(batch_shape))  # tokens, or pixel channels
  chars_per_token = run.data.info.get("train_chars_per_token")
  pending, tick = [], time.perf_counter()

  for step in range(start + 1, t.num_steps + 1):
    batch = sharding.global_batch(run.mesh, next(run.data.train))
    state, metrics = run.train_step(state, batch)
    pending.append(metrics)
    if len(pending) > MAX_STEPS_IN_FLIGHT:
      jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1])

    if step % t.log_every == 0 or step % t.checkpoint_every == 0 or step == t.num_steps:
      # Fetching the metrics is the only host sync; it also guards every checkpoint.
      window = jax.device_get(pending)
      elapsed, tick, pending = time.perf_counter() - tick, time.perf_counter(), []
      logged = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
      if any(m["nonfinite"] for m in window):
        writer.write(step, "train", logged)
        last = run.checkpointer.latest_step()
        raise NonFiniteError(f"non-finite loss or gradient at step {step} (lr {logged['lr']:.3g}); "
                             f"stopped without saving; last good checkpoint: step {last}")
      del logged["nonfinite"]
      logged["tokens_per_s"] = tokens_per_step * len(window) / elapsed
      if run.method.likelihood_metrics:
        logged.update(evaluate.likelihood_report(logged["loss"]))
        if chars_per_token:  # the training split's mean, not this window's own count
          logged["bits_per_char"] = logged["bits_per_token"] / chars_per_token
      writer.write(step, "train", logged)

    if step % t.eval_every == 0 or step == t.num_steps:
      for weights in config.eval.weights:
        report = run.evaluate(state[weights], num_batches=config.eval.num_batches)
        writer.write(step, "eval", {**report, "weights": weights})

    if config.sampling.every and (step % config.sampling.every == 0 or step == t.num_steps):
      report = samples.draw(run, state["ema"], step, nll_fn=reference)
      writer.write(step, "sample", {**report, "weights": "ema"})

    if step % t.checkpoint_every == 0 or step == t.num_steps:
      run.checkpointer.save(step, state, run.data.train.get_state())

  run.checkpointer.close()
  writer.close()
  return state
