"""Shared fixtures, and the XLA set-up of the test session.

XLA's compile time dominates these tests on a CPU (the models are tiny), so the session (and
every subprocess it starts, through the environment) compiles with unoptimised LLVM code, and
keeps compiled programs in a session-wide cache, so that the same program built again by
another test or another main.py run is not compiled twice. The tests assert values, not speed;
the cache holds the very executables XLA built, keyed by the program and the flags.
"""

import atexit
import os
import shutil
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="md4-tests-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


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
