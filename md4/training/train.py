"""The training loop, read top to bottom: lock and resume guard -> set-up -> (resume) -> steps ->
logs, evaluation, samples and checkpoints. What a run guarantees is in docs/runs.md."""

from __future__ import annotations

import logging
import time

import jax
import ml_collections
import numpy as np
from clu import parameter_overview

from md4 import config_lib
from md4.evaluation import evaluate, samples
from md4.evaluation.reference import load_reference
from md4.training import metric_writers, sharding
from md4.training.lock import WorkdirLock
from md4.training.metric_writers import MetricWriter
from md4.training.run import Run, check_resume

# Steps dispatched ahead of the host at most. Unbounded, XLA:CPU's in-process collectives
# deadlock: with 2 simulated devices, a few hundred queued steps starve its all-reduce rendezvous.
MAX_STEPS_IN_FLIGHT = 2


class NonFiniteError(RuntimeError):
  """training.max_nonfinite_steps updates in a row were non-finite (or the run ended in such a
  streak); the run stops after its saves have finished."""


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the newest readable checkpoint in workdir); returns the final state.

  The workdir is locked for the run's lifetime; a resume that would change the model, data or
  tokenizer of the saved config.json is refused before anything is written.
  """
  lock = WorkdirLock(workdir)
  try:
    changes = check_resume(config, workdir)
    run = Run(config, workdir)
    return _train(run, changes)
  finally:
    lock.release()


def _train(run: Run, changes: dict) -> dict:
  config, workdir, t = run.config, run.workdir, run.config.training
  tokenizer = getattr(run.data, "tokenizer", None)
  reference = load_reference(config, tokenizer) if config.sampling.every else None
  state, start = run.restore_or_init()
  config_lib.save(config, workdir)  # after the restore: a refused resume leaves config.json as is
  is_writer = jax.process_index() == 0
  if is_writer and (moved := metric_writers.drop_after(workdir, start)):
    logging.info("moved %d metrics records after step %d to %s", moved, start,
                 metric_writers.REPLACED_FILE)
  writer = MetricWriter(workdir, enabled=is_writer, resumed_at=start)
  if changes:
    writer.write(start, "resume", {"changes": {k: list(v) for k, v in changes.items()}})
  parameter_overview.log_parameter_overview(state["params"], include_stats=False, msg="parameters")
  batch_shape = next(iter(run.data.eval_batches()))[run.data_key].shape[1:]
  tokens_per_step = t.batch_size * int(np.prod(batch_shape))  # tokens, or pixel channels
  units_per_token = run.data.info.get("train_units_per_token")  # characters or bytes
  step_fn, pending = None, []
  streak = 0  # non-finite updates in a row, up to the last host sync
  train_time = 0.0  # seconds of training steps since the last log (no compile, eval, samples...)

  try:
    for step in range(start + 1, t.num_steps + 1):
      batch = sharding.global_batch(run.mesh, next(run.data.train))
      if step_fn is None:  # compiled ahead, so that its time is not counted as training
        tick = time.perf_counter()
        step_fn = run.train_step.lower(state, batch).compile()
        logging.info("compiled the train step in %.1f s", time.perf_counter() - tick)
        tick = time.perf_counter()
      state, metrics = step_fn(state, batch)
      pending.append(metrics)
      if len(pending) > MAX_STEPS_IN_FLIGHT:
        jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1])

      final = step == t.num_steps
      log = step % t.log_every == 0 or step % t.checkpoint_every == 0 or final
      evaluating = step % t.eval_every == 0 or final
      sampling = config.sampling.every and (step % config.sampling.every == 0 or final)
      if not (log or evaluating or sampling):
        continue
      jax.block_until_ready(state)
      train_time += time.perf_counter() - tick

      if log:
        # Fetching the metrics is the only host sync; it also guards every checkpoint.
        window, pending = jax.device_get(pending), []
        skipped = [int(m.pop("nonfinite")) for m in window]
        for s in skipped:
          streak = streak + 1 if s else 0
        logged = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
        logged["skipped_steps"] = sum(skipped)
        logged["tokens_per_s"] = tokens_per_step * len(window) / train_time
        logged["step_s"] = train_time / len(window)  # plot.py integrates it to training time
        train_time = 0.0
        if run.method.likelihood_metrics and getattr(run.method, "loss_is_likelihood", True):
          logged.update(evaluate.likelihood_report(logged["loss"]))
          if units_per_token:  # the training split's mean, not this window's own count
            logged[f"bits_per_{run.unit}"] = logged["bits_per_token"] / units_per_token
        writer.write(step, "train", logged)
        if streak >= t.max_nonfinite_steps or (final and streak):
          run.checkpointer.wait()  # a save in flight finishes, so the one named below exists
          last = run.checkpointer.latest_step()
          raise NonFiniteError(
              f"{streak} non-finite updates in a row up to step {step} (lr {logged['lr']:.3g}), "
              f"all skipped (training.max_nonfinite_steps={t.max_nonfinite_steps}); stopped. "
              + (f"Last checkpoint: step {last} ({run.checkpointer.directory / str(last)})"
                 if last is not None else "No checkpoint was saved"))
        if sum(skipped):
          logging.warning("skipped %d non-finite update(s) in the steps up to %d (%d in a row)",
                          sum(skipped), step, streak)

      if evaluating:
        for weights in config.eval.weights:
          report = run.evaluate(state[weights], num_batches=config.eval.num_batches)
          writer.write(step, "eval", {**report, "weights": weights})

      if sampling:
        report = samples.draw(run, state["ema"], step, nll_fn=reference)
        writer.write(step, "sample", {**report, "weights": "ema"})

      if step % t.checkpoint_every == 0 or final:
        if streak:  # the state is the one before the streak: it may be what makes it diverge
          logging.warning("no checkpoint at step %d: its last %d updates were non-finite", step,
                          streak)
        else:
          run.checkpointer.save(step, state, run.data.train)
      tick = time.perf_counter()
  finally:
    run.checkpointer.close()
    writer.close()
  return state
