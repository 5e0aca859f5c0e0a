"""Entry point: python main.py --config=configs/demo.py --workdir=DIR [--mode=train|eval|sample].

Config values can be overridden on the command line, e.g. --config.optimizer.lr=1e-3.
mode=eval with other data (--config.data.path=...) is zero-shot likelihood. mode=sample takes
one of --prompt, --infill (text, gaps as `_`) or --infill_region (images, e.g. center), and
--class_label for class-conditional image models.
mode=eval and mode=sample read the workdir's config.json (the --config file is only the base of
the command line's overrides, which may not change the model). Bad input (unknown config key or
dataset, wrong vocabulary, missing file, no checkpoint, a resume that changes the model or data,
a workdir in use by another run) ends in one line on stderr and exit status 2; set MD4_DEBUG=1 to
see the traceback. What a training run guarantees is in docs/runs.md.
"""

from __future__ import annotations

import logging as logging_std
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from md4.training import tcmalloc

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")
flags.DEFINE_string("prompt", None, "mode=sample: text the samples start with (kept fixed).")
flags.DEFINE_string("infill", None, "mode=sample: a text template whose `_` characters are "
                    "unknown tokens to fill (one token each); the rest is kept fixed.")
flags.DEFINE_string("infill_region", None, "mode=sample, image models: the region of held-out "
                    "images to fill: top, bottom, left, right, center or 'y0:y1,x0:x1'.")
flags.DEFINE_integer("class_label", None, "mode=sample, class-conditional image models "
                     "(unet.num_classes_cond > 0): the class of every sample (sampling.guidance "
                     "guides toward it against the null class).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Call jax.distributed.initialize(): auto = when the environment asks for it.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

# Environment variables that mean "this process is one of several".
MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def wants_distributed() -> bool:
  """Whether this process is one of several: --distributed, or the launcher's environment."""
  if FLAGS.distributed != "auto":
    return FLAGS.distributed == "on"
  if any(v in os.environ for v in MULTI_PROCESS_ENV):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # multi-host TPU slice


def initialize_distributed() -> None:
  """jax.distributed from the environment (TPU VMs and SLURM are detected by JAX itself).

  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID, when
  set, are passed explicitly. CPU processes exchange collectives over gloo (TCP) unless
  JAX_CPU_COLLECTIVES_IMPLEMENTATION says otherwise; accelerators use their own interconnect.
  """
  import jax

  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
    if missing:
      print(f"error: JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} not",
            file=sys.stderr)
      sys.exit(2)
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


class QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of checkpointing and data libraries; keeps their warnings."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    noisy = any(f"{os.sep}{lib}{os.sep}" in record.pathname for lib in ("orbax", "grain", "etils"))
    return record.levelno >= logging_std.WARNING or not noisy


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(QuietLibraries())
  logging.info("memory allocator: %s%s", tcmalloc.allocator(), "" if tcmalloc.active() else
               " (CPU steps are faster with tcmalloc, see md4/training/tcmalloc.py)")
  if wants_distributed():
    initialize_distributed()
  from etils import epath

  from md4 import config_lib
  from md4.evaluation import inference
  from md4.training import checkpoints, lock, run, train

  expected = (config_lib.ConfigError, ValueError, FileNotFoundError,
              checkpoints.CheckpointError, train.NonFiniteError, lock.WorkdirBusy)
  try:
    if FLAGS.mode != "sample" and (FLAGS.prompt or FLAGS.infill or FLAGS.infill_region
                                   or FLAGS.class_label is not None):
      raise ValueError("--prompt, --infill, --infill_region and --class_label are for "
                       "--mode=sample")
    workdir = epath.Path(FLAGS.workdir)  # a local or bucket (gs://) directory
    if workdir.exists() and not workdir.is_dir():
      raise ValueError(f"--workdir {FLAGS.workdir} is a file, not a directory")
    if FLAGS.mode == "train":
      train.train(FLAGS.config, FLAGS.workdir)
      return
    if FLAGS.mode == "sample" and FLAGS.class_label is None:  # before the workdir is read
      inference.conditioning(FLAGS.config, prompt=FLAGS.prompt, infill_text=FLAGS.infill,
                             infill_region=FLAGS.infill_region)
    config = run.inference_config(FLAGS.workdir, FLAGS["config"].override_values)
    if FLAGS.class_label is not None:
      classes = config.unet.num_classes_cond if config.model_type == "md4_pixels" else 0
      if not 0 <= FLAGS.class_label < classes:
        raise ValueError(f"--class_label {FLAGS.class_label}: " + (
            f"the model's classes are 0..{classes - 1}" if classes else
            f"the {config.model_type} model in {FLAGS.workdir} is not class-conditional"))
      config.sampling.class_label = FLAGS.class_label
    if FLAGS.mode == "eval":
      report = inference.eval_only(config, FLAGS.workdir)
      print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in report.items()))
    else:
      path = inference.sample_only(config, FLAGS.workdir, prompt=FLAGS.prompt,
                               infill_text=FLAGS.infill, infill_region=FLAGS.infill_region)
      if path.endswith(".png"):
        print(f"wrote {path}")
      else:
        print(epath.Path(path).read_text())
  except expected as e:
    if os.environ.get("MD4_DEBUG"):
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a bad config override (unknown key, wrong type) as one error line."""
  from md4 import config_lib

  for arg in argv[1:]:
    # ml_collections prints a traceback for a missing config file; say it in one line instead.
    if arg.startswith("--config=") and not os.path.exists(arg[len("--config="):].split(":")[0]):
      print(f"error: config file not found: {arg[len('--config='):]}", file=sys.stderr)
      sys.exit(2)
    field = arg[len("--config."):].split("=")[0] if arg.startswith("--config.") else ""
    if field in config_lib.REMOVED_FIELDS:
      print(f"error: config.{field} was removed: {config_lib.REMOVED_FIELDS[field]}",
            file=sys.stderr)
      sys.exit(2)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    message = str(e)
  except OSError as e:  # the config file exists but cannot be loaded
    message = f"cannot load the config: {e}"
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = f"bad config override ({type(e).__name__}: {str(e).strip(chr(34))})"
  print("error: " + " ".join(message.split()), file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  tcmalloc.reexec()
  app.run(main, flags_parser=parse_flags)
