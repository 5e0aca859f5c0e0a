"""Every notebook runs headless on a tiny checkpoint made here; a failing cell fails the test."""

import glob
import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "notebooks",
                                                                         "*.ipynb")))
TINY_TEXT = [
    "--config=configs/demo.py", "--config.seq_len=32", "--config.model.width=32",
    "--config.model.depth=1", "--config.model.num_heads=2", "--config.training.batch_size=8",
    "--config.eval.batch_size=8", "--config.eval.num_batches=1",
]
TINY_IMAGES = [
    "--config.unet.base_channels=8", "--config.blackout.num_steps=20",
    "--config.training.batch_size=8", "--config.eval.batch_size=8",
    "--config.eval.num_batches=1",
]
# Small evaluation and sampling, chosen through the notebooks' parameters.
PARAMETERS = {"MD4_EVAL_BATCHES": "1", "MD4_NUM_SAMPLES": "2", "MD4_SAMPLE_STEPS": "8"}


def train_tiny(workdir: str, *args: str) -> str:
  """A 10-step run through main.py; its workdir holds config.json, metrics and a checkpoint."""
  result = subprocess.run(
      [sys.executable, "main.py", f"--workdir={workdir}", *args,
       "--config.training.num_steps=10", "--config.training.log_every=5",
       "--config.training.eval_every=10", "--config.training.checkpoint_every=10",
       "--config.sampling.every=0"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def execute(name: str, workdir: str, monkeypatch) -> nbformat.NotebookNode:
  """Runs notebooks/<name> from the repository root with MD4_WORKDIR=workdir."""
  for key, value in {**PARAMETERS, "MD4_WORKDIR": workdir, "JAX_PLATFORMS": "cpu"}.items():
    monkeypatch.setenv(key, value)
  notebook = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  NotebookClient(notebook, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": ROOT}}).execute()  # raises on a failing cell
  return notebook


def text_output(notebook: nbformat.NotebookNode) -> str:
  return "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                 for out in cell.outputs)


def images_shown(notebook: nbformat.NotebookNode) -> int:
  return sum("image/png" in out.get("data", {}) for cell in notebook.cells
             if cell.cell_type == "code" for out in cell.outputs)


def test_every_notebook_is_tested():
  assert NOTEBOOKS == ["evaluate_images.ipynb", "evaluate_text.ipynb"]


@pytest.mark.slow
def test_evaluate_text(tmp_path, corpus, monkeypatch):
  workdir = train_tiny(str(tmp_path / "run"), *TINY_TEXT, f"--config.data.path={corpus}")
  notebook = execute("evaluate_text.ipynb", workdir, monkeypatch)
  out = text_output(notebook)
  assert "md4 at step 10" in out
  assert "bits per token" in out and "(8 sequences)" in out and "bits per character" in out
  infilled = out.split("template: 'to be or ___ to be'\n\n")[1].split("\n\n")[:2]
  assert len(infilled) == 2
  for text in infilled:  # 32 byte-pair tokens: three unknown ones between the known pieces
    assert len(text) > 32 and text.startswith("to be or ") and text.find(" to be", 12) >= 12
  assert images_shown(notebook) == 1  # the training curves


@pytest.mark.slow
@pytest.mark.parametrize("model_type, report, shown", [
    ("md4_pixels", "bits per dimension (8 images)", 3),  # samples, infilling, curves
    ("blackout", "per pixel (8 images)", 2),  # no infilling
])
def test_evaluate_images(tmp_path, monkeypatch, model_type, report, shown):
  workdir = train_tiny(str(tmp_path / "run"), f"--config=configs/{model_type}_demo.py",
                       *TINY_IMAGES)
  notebook = execute("evaluate_images.ipynb", workdir, monkeypatch)
  out = text_output(notebook)
  assert f"{model_type} at step 10" in out and report in out
  assert images_shown(notebook) == shown
