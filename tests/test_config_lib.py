"""config.json written by a run reads back into the same config."""

import glob
import importlib
import os

import pytest

from md4 import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith("__init__.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_save_load_round_trip(tmp_path, name):
  config = importlib.import_module(f"configs.{name}").get_config()
  config_lib.save(config, str(tmp_path))
  loaded = config_lib.load(str(tmp_path))
  assert loaded == config
  assert loaded.to_dict() == config.to_dict()  # tuples stay tuples
  assert isinstance(loaded.image_shape, tuple) and isinstance(loaded.eval.weights, tuple)


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    config_lib.load(str(tmp_path))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(config_lib.ConfigError, match="is not valid JSON"):
    config_lib.load(str(tmp_path))


def test_fields_missing_from_an_older_run_get_defaults(tmp_path):
  (tmp_path / "config.json").write_text('{"seq_len": 64, "sampling": {"num_steps": 7}}')
  loaded = config_lib.load(str(tmp_path))
  assert loaded.seq_len == 64 and loaded.sampling.num_steps == 7
  assert loaded.sampling.grid == config_lib.base().sampling.grid


@pytest.mark.parametrize("overrides, message", [
    ({"diffusion.schedule": "poly"}, "unknown schedule 'poly'"),
    ({"training.grad_accum": 3}, "not divisible"),
    ({"model_type": "ar", "model.time_conditioning": True}, "set model.time_conditioning=False"),
    ({"optimizer.name": "sgd"}, "optimizer.name must be adamw or muon"),
    ({"model.matmul_dtype": "float16"}, "model.matmul_dtype must be"),
    ({"diffusion.train_estimator": "count", "model.time_conditioning": True},
     "needs model.time_conditioning=False"),
])
def test_inconsistent_values_are_one_clear_error(overrides, message):
  """What main.py reports as one line (tests/test_train.py runs one such case end to end)."""
  config = config_lib.base()
  config.training.batch_size = 8  # with grad_accum 3: a micro-batch that is not whole
  for field, value in overrides.items():
    *sections, name = field.split(".")
    target = config
    for section in sections:
      target = target[section]
    target[name] = value
  with pytest.raises(config_lib.ConfigError, match=message) as error:
    config_lib.validate(config)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("field, value, message", [
    ("model.mlp", "gelu", "model.mlp must be swiglu or relu2"),
    ("model.norm", "batchnorm", "model.norm must be layernorm or rmsnorm"),
    ("optimizer.schedule", "cosin", "optimizer.schedule must be cosine, linear or constant"),
    ("optimizer.muon_ns_steps", 0, "optimizer.muon_ns_steps must be at least 1"),
])
def test_architecture_and_optimizer_choices_are_validated(field, value, message):
  config = config_lib.base()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)
