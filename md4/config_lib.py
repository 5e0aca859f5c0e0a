"""The config schema: defaults every experiment starts from, and up-front validation.

Experiment files in configs/ call `base()` and change what they need. `validate` runs before
anything is built, so a bad value ends in one clear error line instead of a failure mid-run.
"""

from __future__ import annotations

import json

import jax
import ml_collections
from etils import epath

from md4.data import IMAGE_DATASETS
from md4.diffusion import blackout, confidence, glauber, remasking
from md4.diffusion.schedules import get_schedule

# The methods of md4.methods.METHODS (the registry imports the networks; the schema does not).
MODEL_TYPES = ("md4", "genmd4", "ggm", "ar", "blackout", "md4_pixels")


# Fields earlier releases had, with why they went: an override of one is refused with this line,
# and a saved config.json that has one loads without it.
REMOVED_FIELDS = {
    "optimizer.muon_matmul_dtype": "Muon is optax.contrib.muon now, whose Newton-Schulz "
                                   "iteration runs in the parameters' dtype",
}


class ConfigError(ValueError):
  """A config value is missing, unknown or inconsistent."""


def base() -> ml_collections.ConfigDict:
  """Defaults: a small character-level MD4 on the offline Shakespeare corpus."""
  c = ml_collections.ConfigDict()
  c.model_type = "md4"
  c.seed = 0
  c.seq_len = 128
  c.vocab_size = 27  # must match the tokenizer; checked before training

  c.data = ml_collections.ConfigDict(dict(
      dataset="text_files",  # text8 | text_files | owt | tfds
      tokenizer="char",      # char | bpe | byte_bpe | gpt2
      tokenizer_path="",     # gpt2: its ranks file; bpe, byte_bpe: tokenizer.json (read, or
                             # learned and written)
      path="data/shakespeare",  # the dataset's file or directory (tfds: its data_dir)
      holdout_fraction=0.1,  # text_files: the last fraction of the corpus is held out
      eval_split="valid",    # text8: valid | test
      tfds_name="", tfds_train_split="train", tfds_eval_split="validation", text_key="text",
      source="",             # images: "" (the dataset's default) | tfds | npy | pickle
      # Images; None: the dataset's default (binarize: mnist; flip: cifar10).
      binarize=ml_collections.FieldReference(None, field_type=bool),  # threshold at 128 to {0, 1}
      flip=ml_collections.FieldReference(None, field_type=bool),  # random horizontal flips
      read_threads=2, prefetch=8,  # grain reader threads and prefetch depth for training
  ))
  c.model = ml_collections.ConfigDict(dict(
      width=128, depth=4, num_heads=4, mlp_ratio=4.0, dropout=0.0, dtype="float32",
      # bfloat16: dense layers' operands only, float32 accumulation; "": dtype; auto: bfloat16
      # on a CPU with AMX, else dtype (resolved and logged when the model is built)
      matmul_dtype="",
      mlp="swiglu",  # swiglu | relu2 (squared ReLU, hidden mlp_ratio * width)
      norm="layernorm",  # layernorm | rmsnorm
      time_conditioning=True, remat=False,
      # > 0: beside attention, each block adds a depthwise convolution of this kernel size
      # along the sequence (zero-initialised; causal for AR), which reads the neighbours.
      local_mix=0,
  ))
  # The accelerator path (docs/scaling.md): attention backend and vocabulary padding.
  c.model.attention = "auto"  # auto | xla | cudnn | splash | cpu (md4/networks/attention.py)
  c.model.pad_vocab_to = -1  # vocab axes padded to a multiple: -1 = 128 above 1024 tokens; 1 = off
  c.diffusion = ml_collections.ConfigDict(dict(
      schedule="linear",
      num_steps=0,         # 0: continuous-time NELBO; T > 0: discrete time with T steps
      head_fraction=1.0,   # < 1: output head only at masked positions (capacity fraction of B*L)
      train_estimator="time",  # md4's training NELBO: time | count (networks without time input)
  ))
  c.ggm = ml_collections.ConfigDict(dict(
      sweeps=2,              # K: visits of every position; T = K * seq_len steps
      loss="soft",           # soft | hard | ce
      renoise_known=False,   # infilling variant: re-noise known tokens at each step
      noise="uniform",       # noise law u: uniform | unigram (training split's token frequencies)
      aux_queries=0,         # M > 0: some rows query M upcoming visits at once (auxiliary task)
      aux_rows=0.5,          # with aux_queries: the share of the batch's rows that do
  ))
  c.image_shape = (28, 28, 1)  # image datasets only
  c.unet = ml_collections.ConfigDict(dict(
      base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(7,),
      num_heads=4, dropout=0.0, dtype="float32",
      embed_dim=32,  # md4_pixels: embedding width per channel value
  ))
  c.blackout = ml_collections.ConfigDict(dict(
      num_steps=1000, t_end=10.0, max_count=1, weighting="instantaneous", sampler="tau_leaping",
  ))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw",  # adamw | muon (Muon on the blocks' matrices, lr muon_lr; AdamW elsewhere)
      muon_lr=0.01, muon_beta=0.95, muon_ns_steps=5,  # Newton-Schulz iterations per step
      lr=1e-3, warmup_steps=100, schedule="cosine",  # cosine | linear | constant after warm-up
      min_lr_ratio=0.1, weight_decay=0.0,
      b1=0.9, b2=0.999, grad_clip=1.0,
  ))
  c.training = ml_collections.ConfigDict(dict(
      batch_size=32, num_steps=1000, grad_accum=1, ema_decay=0.999, ema_warmup=True,
      log_every=50, eval_every=500, checkpoint_every=500, keep_checkpoints=3,
  ))
  # Non-finite policy (docs/runs.md): a step whose loss or gradient is NaN/inf is skipped (the
  # state is kept) and counted; this many skipped steps in a row stop the run.
  c.training.max_nonfinite_steps = 10
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=32, num_batches=16, weights=("params", "ema"),
      time_samples=1,        # independent time/mask draws per held-out example (fixed keys)
      reference_workdir="",  # an AR run's workdir: samples also report gen_ppl under it
      reference="",  # gpt2:PATH, a Hugging Face GPT-2 snapshot: gen_ppl under it (docs/gpt2.md)
  ))
  c.sampling = ml_collections.ConfigDict(dict(
      every=0, num_samples=4, num_steps=128, grid="uniform", top_p=0.0, temperature=1.0,
      top_k=0,  # 0: off
      method="ancestral",  # ancestral | remdm | confidence (md4; genmd4: ancestral | confidence)
      remask_schedule="cap", eta=0.02,  # remdm: cap | rescale | conf | loop, and its eta
      loop_alpha_on=0.9, loop_t_on=0.55, loop_t_off=0.05,  # remdm loop: held alpha, its stretch
      confidence="max_prob",  # confidence: max_prob | margin | neg_entropy
      gumbel_temperature=0.0,  # confidence: order noise (0: deterministic, inf: random order)
      tokens_per_step=0,  # confidence: k revealed per step (0: the schedule's share)
      block_size=0,  # > 0: semi-autoregressive blocks of this size (must divide seq_len)
      guidance=0.0,  # classifier-free guidance scale g with a prompt (md4, genmd4)
  ))
  # Class-conditional MD4 on pixels (md4_pixels): labels from the data; K is the null class.
  c.unet.num_classes_cond = 0      # K > 0: conditional on the data's K classes (10 for all sets)
  c.diffusion.label_dropout = 0.1  # training: the share of labels replaced by the null class
  c.sampling.class_label = -1      # mode=sample (--class_label): every sample's class (-1: none)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  return c


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(f"config: {message}")


def _one_of(name: str, value, allowed: tuple) -> None:
  _require(value in allowed, f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values and their consistency; raises ConfigError with one clear line."""
  _require(config.model_type in MODEL_TYPES,
           f"unknown model_type {config.model_type!r}; known: {', '.join(MODEL_TYPES)}")
  try:
    get_schedule(config.diffusion.schedule)
  except ValueError as e:
    raise ConfigError(f"config: diffusion.schedule: {e}") from None
  t, m = config.training, config.model
  _require(config.seq_len > 0, f"seq_len must be positive, got {config.seq_len}")
  _require(m.dtype in ("float32", "bfloat16"), f"model.dtype must be float32 or bfloat16, "
           f"got {m.dtype!r}")
  _require(m.matmul_dtype in ("", "float32", "bfloat16", "auto"),
           f"model.matmul_dtype must be '', float32, bfloat16 or auto, got {m.matmul_dtype!r}")
  _require(m.mlp in ("swiglu", "relu2"), f"model.mlp must be swiglu or relu2, got {m.mlp!r}")
  _require(m.norm in ("layernorm", "rmsnorm"),
           f"model.norm must be layernorm or rmsnorm, got {m.norm!r}")
  _one_of("model.attention", m.attention, ("auto", "xla", "cudnn", "splash", "cpu"))
  _require(m.pad_vocab_to == -1 or m.pad_vocab_to >= 1,
           f"model.pad_vocab_to must be -1 (auto) or at least 1, got {m.pad_vocab_to}")
  _require(m.width % m.num_heads == 0 and (m.width // m.num_heads) % 2 == 0,
           f"model.width {m.width} must split into num_heads {m.num_heads} heads of even size")
  _require(not (config.model_type == "ar" and m.time_conditioning),
           "model_type 'ar' has no diffusion time: set model.time_conditioning=False")
  _require(t.num_steps > 0, "training.num_steps must be positive")
  for name in ("log_every", "eval_every", "checkpoint_every", "grad_accum"):
    _require(t[name] > 0, f"training.{name} must be positive, got {t[name]}")
  _require(t.max_nonfinite_steps > 0,
           f"training.max_nonfinite_steps must be positive, got {t.max_nonfinite_steps}")
  _require(0.0 <= t.ema_decay < 1.0, f"training.ema_decay must be in [0, 1), got {t.ema_decay}")
  _require(t.batch_size % t.grad_accum == 0,
           f"training.batch_size {t.batch_size} is not divisible by grad_accum {t.grad_accum}")
  devices = jax.device_count()
  micro = t.batch_size // t.grad_accum
  _require(micro % devices == 0, f"the micro-batch {micro} (batch_size / grad_accum) is not "
           f"divisible by the {devices} devices")
  _require(config.eval.batch_size % devices == 0,
           f"eval.batch_size {config.eval.batch_size} is not divisible by the {devices} devices")
  for w in config.eval.weights:
    _require(w in ("params", "ema"), f"eval.weights entries must be 'params' or 'ema', got {w!r}")
  _require(config.eval.time_samples >= 1,
           f"eval.time_samples must be at least 1, got {config.eval.time_samples}")
  _require(config.sampling.grid in ("uniform", "cosine"),
           f"sampling.grid must be uniform or cosine, got {config.sampling.grid!r}")
  _require(config.sampling.num_steps > 0, "sampling.num_steps must be positive")
  _require(0.0 <= config.sampling.top_p <= 1.0, "sampling.top_p must be in [0, 1] (0: off)")
  _require(config.sampling.temperature > 0, "sampling.temperature must be positive")
  _validate_sampler(config)
  o = config.optimizer
  _require(o.name in ("adamw", "muon"), f"optimizer.name must be adamw or muon, got {o.name!r}")
  _require(o.lr > 0 and o.muon_lr > 0, "optimizer.lr and optimizer.muon_lr must be positive")
  _require(o.schedule in ("cosine", "linear", "constant"),
           f"optimizer.schedule must be cosine, linear or constant, got {o.schedule!r}")
  _require(o.muon_ns_steps >= 1, f"optimizer.muon_ns_steps must be at least 1, "
           f"got {o.muon_ns_steps}")
  _require(0.0 < config.diffusion.head_fraction <= 1.0, "diffusion.head_fraction must be in (0, 1]")
  d = config.diffusion
  _require(d.train_estimator in ("time", "count"),
           f"diffusion.train_estimator must be time or count, got {d.train_estimator!r}")
  _require(d.train_estimator == "time" or config.model_type != "md4"
           or (not m.time_conditioning and not d.num_steps),
           "diffusion.train_estimator=count needs model.time_conditioning=False and "
           "diffusion.num_steps=0 (it is exact only for networks that ignore t)")
  _one_of("blackout.weighting", config.blackout.weighting, blackout.WEIGHTINGS)
  _one_of("blackout.sampler", config.blackout.sampler, blackout.SAMPLERS)
  _require(config.ggm.sweeps >= 1, "ggm.sweeps must be at least 1")
  _one_of("ggm.loss", config.ggm.loss, glauber.LOSS_KINDS)
  _one_of("ggm.noise", config.ggm.noise, glauber.NOISE_LAWS)
  _require(0 <= config.ggm.aux_queries <= config.seq_len,
           f"ggm.aux_queries must be in 0..seq_len ({config.seq_len}), got "
           f"{config.ggm.aux_queries}")
  _require(0.0 < config.ggm.aux_rows < 1.0,
           f"ggm.aux_rows must be in (0, 1) (some rows keep the one-visit task the sampler "
           f"needs), got {config.ggm.aux_rows}")


SAMPLING_METHODS = {"md4": ("ancestral", "remdm", "confidence"),
                    "genmd4": ("ancestral", "confidence")}  # other models: their own sampler


def _validate_sampler(config: ml_collections.ConfigDict) -> None:
  """sampling.method and its parameters against the model type and seq_len."""
  s, seq_len = config.sampling, config.seq_len
  methods = SAMPLING_METHODS.get(config.model_type, ("ancestral",))
  _require(s.method in methods, f"sampling.method {s.method!r} is not available for model_type "
           f"{config.model_type!r}; available: {', '.join(methods)}")
  _require(s.top_k >= 0, f"sampling.top_k must be >= 0 (0: off), got {s.top_k}")
  _require(s.guidance >= 0, f"sampling.guidance must be >= 0, got {s.guidance}")
  classes = config.unet.num_classes_cond if config.model_type == "md4_pixels" else 0
  _require(not s.guidance or config.model_type in SAMPLING_METHODS or classes,
           f"sampling.guidance needs a prompt-conditional model (md4, genmd4) or a class-"
           f"conditional md4_pixels (unet.num_classes_cond > 0); model_type "
           f"{config.model_type!r} has no conditional branch")
  _require(config.unet.num_classes_cond >= 0 and (classes or not config.unet.num_classes_cond),
           f"unet.num_classes_cond is for model_type md4_pixels (>= 0), got "
           f"{config.unet.num_classes_cond} for {config.model_type!r}")
  _require(0.0 <= config.diffusion.label_dropout < 1.0,
           f"diffusion.label_dropout must be in [0, 1), got {config.diffusion.label_dropout}")
  _require(s.class_label == -1 or 0 <= s.class_label < classes,
           f"class_label {s.class_label}: " + (f"the model's classes are 0..{classes - 1}"
           if classes else "the model is not class-conditional (unet.num_classes_cond = 0)"))
  _require(s.block_size == 0 or config.model_type in SAMPLING_METHODS,
           f"sampling.block_size is for md4 and genmd4, not {config.model_type!r}")
  _require(s.block_size >= 0 and (s.block_size == 0 or seq_len % s.block_size == 0),
           f"sampling.block_size {s.block_size} does not divide seq_len {seq_len} (0: off)")
  if s.method == "remdm":
    _one_of("sampling.remask_schedule", s.remask_schedule, remasking.SIGMA_SCHEDULES)
    _require(s.eta >= 0 and (s.remask_schedule != "rescale" or s.eta <= 1),
             f"sampling.eta must be >= 0 (rescale: in [0, 1]), got {s.eta}")
    _require(0 < s.loop_t_off < s.loop_t_on < 1 and 0 < s.loop_alpha_on < 1,
             "sampling.loop_* need 0 < loop_t_off < loop_t_on < 1 and 0 < loop_alpha_on < 1")
  if s.method == "confidence":
    _one_of("sampling.confidence", s.confidence, confidence.CONFIDENCES)
    _require(s.gumbel_temperature >= 0, f"sampling.gumbel_temperature must be >= 0, got "
             f"{s.gumbel_temperature}")
    limit = s.block_size or seq_len
    _require(0 <= s.tokens_per_step <= limit, f"sampling.tokens_per_step {s.tokens_per_step} "
             f"exceeds the {limit} positions decoded at once (0: the schedule's share)")


def check_data(config: ml_collections.ConfigDict, data) -> int:
  """The vocabulary size, checked (with image shape and count range) against the data."""
  if hasattr(data, "image_shape"):
    _require(tuple(config.image_shape) == tuple(data.image_shape),
             f"image_shape {tuple(config.image_shape)} does not match the data's "
             f"{tuple(data.image_shape)}")
    if config.model_type == "blackout":
      _require(config.blackout.max_count == data.max_count,
               f"blackout.max_count {config.blackout.max_count} does not match the data's "
               f"{data.max_count}")
    source = f"{config.data.dataset!r} data"
  else:
    source = f"{config.data.tokenizer!r} tokenizer"
  _require(data.vocab_size == config.vocab_size,
           f"vocab_size {config.vocab_size} does not match the {source}'s {data.vocab_size}")
  return config.vocab_size


def check_reference(config: ml_collections.ConfigDict,
                    reference: ml_collections.ConfigDict) -> None:
  """Checks that the AR model of `reference` (a run's saved config) can score `config`'s samples."""
  where = f"eval.reference_workdir {config.eval.reference_workdir}"
  _require(config.data.dataset not in IMAGE_DATASETS,
           f"{where}: generative perplexity scores text samples, not "
           f"{config.data.dataset!r} images")
  _require(reference.model_type == "ar",
           f"{where} holds a {reference.model_type!r} run; the reference must be model_type 'ar'")
  _require(reference.vocab_size == config.vocab_size
           and reference.data.tokenizer == config.data.tokenizer,
           f"{where}: its vocabulary ({reference.data.tokenizer}, {reference.vocab_size}) differs "
           f"from this run's ({config.data.tokenizer}, {config.vocab_size})")
  _require(reference.seq_len >= config.seq_len,
           f"{where}: its seq_len {reference.seq_len} is shorter than this run's {config.seq_len}")


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config to workdir/config.json (process 0; a local or bucket path)."""
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))


def load(workdir: str) -> ml_collections.ConfigDict:
  """The config that `save` wrote to workdir/config.json (a local or bucket path), over `base()`.

  Fields newer than the run keep their defaults; JSON lists come back as tuples, as the config
  files write them.
  """
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir} the workdir of a trained run?")
  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON ({e})") from None
  for field in REMOVED_FIELDS:
    *sections, name = field.split(".")
    section = saved
    for key in sections:
      section = section.get(key, {}) if isinstance(section, dict) else {}
    if isinstance(section, dict):
      section.pop(name, None)
  config = base()
  config.update(_tuples(saved))
  return config


def _tuples(value):
  """`value` with every list (recursively) turned into a tuple."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value
