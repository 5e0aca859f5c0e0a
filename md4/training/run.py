"""The set-up every mode shares: config, mesh, data, method, optimizer, the train state's shapes
and shardings, the jitted train / eval / sample steps, and the checkpointer; and the resume
guard, which keeps a workdir's model, data and tokenizer those of its saved config.json."""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from md4 import config_lib, methods
from md4.data import images
from md4.data.pipeline import create_datasets
from md4.evaluation import evaluate
from md4.training import checkpoints, sharding
from md4.training.optimizer import make_optimizer
from md4.training.step import batch_data, init_state, train_step

TOKENIZER_FILE = "tokenizer.json"  # a run's learned tokenizer (data.tokenizer=bpe), in its workdir
NOISE_FILE = "noise.npy"  # GGM's unigram noise law (ggm.noise=unigram), in its workdir
NOISE_TOKENS = 1 << 24  # training tokens it counts (a shuffled sample of a larger split)

# Config fields that make the checkpoint what it is (model, tokenizer, optimizer state): fixed for
# a workdir in every mode. A key ending in "." stands for all the fields below it.
MODEL_FIELDS = ("model_type", "seq_len", "vocab_size", "image_shape", "model.", "diffusion.",
                "ggm.", "unet.", "blackout.", "data.tokenizer", "data.tokenizer_path",
                "optimizer.name")
# Also fixed when training resumes: what decides the data stream (except how it is read).
DATA_FIELDS = ("seed", "training.batch_size", "data.")
READ_FIELDS = ("data.read_threads", "data.prefetch")


def _matches(key: str, fields: tuple[str, ...]) -> bool:
  return any(key == f or (f.endswith(".") and key.startswith(f)) for f in fields)


def _flat(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
  """Dot-keyed leaves of a config, as config.json writes them (tuples as lists)."""
  items = config.items() if isinstance(config, dict) else config.to_dict().items()
  flat = {}
  for key, value in items:
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = json.loads(json.dumps(value, default=str))
  return flat


def _refuse(workdir: str, fixed: dict[str, tuple[Any, Any]], mode: str) -> None:
  if fixed:
    listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(fixed.items()))
    raise config_lib.ConfigError(
        f"config: {workdir} holds a run with other settings that cannot change on {mode}: "
        f"{listed}; keep the saved values (config.json) or use a new workdir")


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> dict[str, tuple[Any, Any]]:
  """The resume guard of mode=train: {key: (saved, new)} of the changed fields.

  Only a workdir with checkpoints and a config.json is checked. A change to a field of the
  model, data or tokenizer (MODEL_FIELDS, DATA_FIELDS) raises ConfigError naming every such
  key; other changes (learning rate, step count, intervals, ...) are returned, to be recorded.
  """
  if not (checkpoints.has_checkpoints(os.path.join(workdir, "checkpoints"))
          and (epath.Path(workdir) / "config.json").exists()):
    return {}
  saved, new = _flat(config_lib.load(workdir)), _flat(config)
  changed = {k: (saved.get(k), v) for k, v in new.items() if saved.get(k) != v}
  _refuse(workdir, {k: d for k, d in changed.items() if _matches(k, MODEL_FIELDS + DATA_FIELDS)
                    and not _matches(k, READ_FIELDS)}, "resume")
  return changed


def inference_config(workdir: str, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """The config of mode=eval and mode=sample: the workdir's config.json with the command line's
  `overrides` (flat keys) applied; one that changes a MODEL_FIELDS field raises ConfigError."""
  config = config_lib.load(workdir)
  saved = _flat(config)
  given = {k: json.loads(json.dumps(v, default=str)) for k, v in overrides.items()}
  _refuse(workdir, {k: (saved.get(k), v) for k, v in given.items()
                    if _matches(k, MODEL_FIELDS) and saved.get(k) != v}, "eval or sample")
  config.update_from_flattened_dict(overrides)
  return config


class Run:
  """Everything a mode needs: config, mesh, data, method, optimizer, jitted steps.

  With `with_data=False` no data is read (`data` is None): the model, its state's shapes and the
  checkpoint depend on the config alone.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, with_data: bool = True,
               read_only: bool = False):
    config_lib.validate(config)
    self.config, self.workdir = config, workdir
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    self.is_image = config.data.dataset in images.IMAGE_DATASETS
    self.data_key = "images" if self.is_image else "tokens"
    # What the method's loss takes: batch[data_key], or for a class-conditional image model the
    # whole batch {"images", "labels"} (None).
    labels = self.is_image and config.model_type == "md4_pixels" and config.unet.num_classes_cond
    self.method_key = None if labels else self.data_key
    common = dict(batch_size=config.training.batch_size, seed=config.seed,
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  eval_batch_size=config.eval.batch_size)
    self.data = None
    if with_data and self.is_image:
      self.data = images.create_image_datasets(config.data, labels=bool(labels), **common)
    elif with_data:
      # A learned (bpe, byte_bpe) tokenizer is kept with the run, so that eval and sample modes (and
      # zero-shot evaluation on other data) encode text as training did.
      self.data = create_datasets(config.data, seq_len=config.seq_len, **common,
                                  vocab_size=config.vocab_size,
                                  tokenizer_file=os.path.join(workdir, TOKENIZER_FILE))
    vocab_size = config_lib.check_data(config, self.data) if with_data else config.vocab_size
    data_stats = {}
    if config.model_type == "ggm" and config.ggm.noise == "unigram":
      data_stats["noise_law"] = unigram_noise_law(self.data, workdir, vocab_size,
                                                  write=not read_only)
    self.method = methods.create(config, vocab_size, **data_stats)
    self.tx, self.lr = make_optimizer(config, config.training.num_steps)
    # Independent streams for init, training steps, evaluation and sampling.
    self.init_rng, self.train_rng, self.eval_rng, self.sample_rng = jax.random.split(
        jax.random.key(config.seed), 4)
    self.checkpointer = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                                 max_to_keep=config.training.keep_checkpoints,
                                                 read_only=read_only)

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
                                config=config, rng=self.train_rng, data_key=self.method_key,
                                mesh=self.mesh)
    self.train_step = jax.jit(step_fn, donate_argnums=0,
                              out_shardings=(self.state_sharding, None))
    # Per-example eval outputs come back replicated so that every process can read them; text
    # examples also report their length in characters (for bits per character).
    tokenizer = getattr(self.data, "tokenizer", None)
    lengths = getattr(tokenizer, "token_lengths", None)
    self.unit = getattr(tokenizer, "unit", "char")  # what `lengths` count: characters or bytes
    def eval_step(params, batch, rng):
      out = self.method.evaluate(params, batch_data(batch, self.method_key), rng)
      if lengths is not None:
        out[evaluate.UNITS] = jnp.asarray(lengths)[batch[self.data_key]].sum(-1)
      return out
    self.eval_step = jax.jit(eval_step, out_shardings=sharding.replicated(self.mesh))
    self.sample_step = jax.jit(self.method.sample, static_argnums=2)
    with_calls = getattr(self.method, "sample_with_calls", None)  # -> (samples, network calls)
    self.sample_with_calls = with_calls and jax.jit(with_calls, static_argnums=2)

  def restore_or_init(self) -> tuple[dict, int]:
    """The newest readable checkpoint of the workdir (with the data iterator set to its saved
    position), or a fresh state at step 0."""
    restored = self.checkpointer.restore_latest(self.abstract_state, self.data.train)
    if restored is None:
      return self._init_state(self.init_rng), 0
    step, state = restored
    logging.info("resumed from the checkpoint at step %d", step)
    return state, step

  def evaluate(self, params: Any, *, num_batches: int) -> dict[str, float]:
    """Method metrics on held-out data (fixed batches and keys; means per example)."""
    return evaluate.held_out(self.eval_step, params, self.data.eval_batches(), self.mesh,
                             rng=self.eval_rng, num_batches=num_batches,
                             likelihood_metrics=self.method.likelihood_metrics,
                             time_samples=self.config.eval.time_samples, unit=self.unit,
                             split_batches=self.data.info.get("eval_batches"))


def unigram_noise_law(data: Any, workdir: str, vocab_size: int, *, write: bool) -> np.ndarray:
  """GGM's noise law u for ggm.noise=unigram: the workdir's noise.npy, else the add-one smoothed
  token frequencies of about NOISE_TOKENS training tokens (the whole split when smaller, in the
  training order; the iterator is put back where it was), saved there when `write`."""
  path = os.path.join(workdir, NOISE_FILE)
  if os.path.exists(path):
    law = np.load(path)
    if law.shape != (vocab_size,):
      raise config_lib.ConfigError(f"config: {path} holds a noise law over {law.shape[0]} "
                                   f"tokens, the model has {vocab_size}")
    return law
  if data is None:
    raise config_lib.ConfigError(f"config: ggm.noise=unigram needs {path}, written by training")
  state = data.train.get_state()
  first = np.asarray(next(data.train)["tokens"])
  global_batch = first.size * jax.process_count()  # tokens per global batch
  total = min(data.info["train_sequences"] * first.shape[1], NOISE_TOKENS)
  counts = np.bincount(first.reshape(-1), minlength=vocab_size)
  for _ in range(max(1, total // global_batch) - 1):
    counts += np.bincount(np.asarray(next(data.train)["tokens"]).reshape(-1), minlength=vocab_size)
  data.train.set_state(state)
  if jax.process_count() > 1:
    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
  law = (counts + 1.0) / (counts.sum() + vocab_size)
  logging.info("ggm: unigram noise law from %d training tokens", counts.sum())
  if write and jax.process_index() == 0:
    with open(path + ".tmp", "wb") as f:
      np.save(f, law)
    os.replace(path + ".tmp", path)
  return law


def load_for_inference(config: ml_collections.ConfigDict, workdir: str, *,
                       with_data: bool = True) -> tuple[Run, dict, int]:
  """(run, state, step) of the newest readable checkpoint in workdir: its step, params and EMA
  (the optimizer's state is not read).

  The restore depends on the config's model only, so `config.data` may name any dataset with
  the same vocabulary (zero-shot evaluation); `with_data=False` reads no data at all.
  """
  directory = os.path.join(workdir, "checkpoints")
  missing = checkpoints.CheckpointError(f"no checkpoint in {checkpoints.absolute(directory)}; "
                                        "train first (--mode=train)")
  if not checkpoints.has_checkpoints(directory):  # before anything is read or written
    raise missing
  run = Run(config, workdir, with_data=with_data, read_only=True)
  weights = {k: v for k, v in run.abstract_state.items() if k != "opt_state"}
  restored = run.checkpointer.restore_latest(weights, partial=True)
  if restored is None:
    raise missing
  step, state = restored
  return run, state, step
