"""The set-up every mode shares: config, mesh, data, method, optimizer, the train state's shapes
and shardings, the jitted train / eval / sample steps, and the checkpointer."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from md4 import config_lib, methods
from md4.data import images
from md4.data.pipeline import create_datasets
from md4.evaluation import evaluate
from md4.training import checkpoints, sharding
from md4.training.optimizer import make_optimizer
from md4.training.step import init_state, train_step

TOKENIZER_FILE = "tokenizer.json"  # a run's learned tokenizer (data.tokenizer=bpe), in its workdir


class Run:
  """Everything a mode needs: config, mesh, data, method, optimizer, jitted steps.

  With `with_data=False` no data is read (`data` is None): the model, its state's shapes and the
  checkpoint depend on the config alone.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, with_data: bool = True):
    config_lib.validate(config)
    self.config, self.workdir = config, workdir
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    self.is_image = config.data.dataset in images.IMAGE_DATASETS
    self.data_key = "images" if self.is_image else "tokens"
    common = dict(batch_size=config.training.batch_size, seed=config.seed,
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  eval_batch_size=config.eval.batch_size)
    self.data = None
    if with_data and self.is_image:
      self.data = images.create_image_datasets(config.data, **common)
    elif with_data:
      # A learned (bpe) tokenizer is kept with the run, so that eval and sample modes (and
      # zero-shot evaluation on other data) encode text as training did.
      self.data = create_datasets(config.data, seq_len=config.seq_len, **common,
                                  vocab_size=config.vocab_size,
                                  tokenizer_file=os.path.join(workdir, TOKENIZER_FILE))
    vocab_size = config_lib.check_data(config, self.data) if with_data else config.vocab_size
    self.method = methods.create(config, vocab_size)
    self.tx, self.lr = make_optimizer(config, config.training.num_steps)
    # Independent streams for init, training steps, evaluation and sampling.
    self.init_rng, self.train_rng, self.eval_rng, self.sample_rng = jax.random.split(
        jax.random.key(config.seed), 4)
    self.checkpointer = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                                   max_to_keep=config.training.keep_checkpoints)

    # The train state: params, optimizer moments, EMA params and the step. Shapes first, then the
    # shardings (FSDP where large), then the real thing materialised directly in that layout.
    init = functools.partial(init_state, self.method, self.tx)
    abstract = jax.eval_shape(init, self.init_rng)
    self.state_sharding = sharding.state_shardings(self.mesh, abstract)
    self._init_state = jax.jit(init, out_shardings=self.state_sharding)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
        self.state_sharding)
    step_fn = functools.partial(train_step, method=self.method, tx=self.tx, lr=self.lr,
                                config=config, rng=self.train_rng, data_key=self.data_key)
    self.train_step = jax.jit(step_fn, donate_argnums=0,
                              out_shardings=(self.state_sharding, None))
    # Per-example eval outputs come back replicated so that every process can read them; text
    # examples also report their length in characters (for bits per character).
    lengths = getattr(getattr(self.data, "tokenizer", None), "token_lengths", None)
    def eval_step(params, batch, rng):
      out = self.method.evaluate(params, batch[self.data_key], rng)
      if lengths is not None:
        out[evaluate.CHARS] = jnp.asarray(lengths)[batch[self.data_key]].sum(-1)
      return out
    self.eval_step = jax.jit(eval_step, out_shardings=sharding.replicated(self.mesh))
    self.sample_step = jax.jit(self.method.sample, static_argnums=2)
    with_calls = getattr(self.method, "sample_with_calls", None)  # -> (samples, network calls)
    self.sample_with_calls = with_calls and jax.jit(with_calls, static_argnums=2)

  def restore_or_init(self) -> tuple[dict, int]:
    """The newest readable checkpoint of the workdir, or a fresh state at step 0."""
    restored = self.checkpointer.restore_latest(self.abstract_state)
    if restored is None:
      return self._init_state(self.init_rng), 0
    step, state, data_state = restored
    if self.data is not None:
      self.data.train.set_state(data_state)
    logging.info("resumed from the checkpoint at step %d", step)
    return state, step

  def evaluate(self, params: Any, *, num_batches: int) -> dict[str, float]:
    """Method metrics on held-out data (fixed batches and keys; means per example)."""
    return evaluate.held_out(self.eval_step, params, self.data.eval_batches(), self.mesh,
                             rng=self.eval_rng, num_batches=num_batches,
                             likelihood_metrics=self.method.likelihood_metrics,
                             time_samples=self.config.eval.time_samples)


def load_for_inference(config: ml_collections.ConfigDict, workdir: str, *,
                       with_data: bool = True) -> tuple[Run, dict, int]:
  """(run, state, step) of the newest readable checkpoint in workdir.

  The restore depends on the config's model only, so `config.data` may name any dataset with
  the same vocabulary (zero-shot evaluation); `with_data=False` reads no data at all.
  """
  run = Run(config, workdir, with_data=with_data)
  restored = run.checkpointer.restore_latest(run.abstract_state)
  if restored is None:
    raise checkpoints.CheckpointError(f"no checkpoint in {run.checkpointer.directory}; "
                                        "train first (--mode=train)")
  step, state, _ = restored
  return run, state, step
