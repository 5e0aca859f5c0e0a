"""Shared fixtures, and the XLA compilation cache of the test session.

XLA's compile time dominates most of these tests on a CPU (the models are tiny), and several
tests (and main.py runs) build the same programs: the session keeps compiled programs in a
session-wide cache (JAX_COMPILATION_CACHE_DIR if set, as .ci/run sets it for both suites),
inherited by every subprocess it starts through the environment. The cache
holds the very executables XLA built, keyed by the program and the flags. (Unoptimised LLVM
code, --xla_backend_optimization_level=0, compiles ~30% faster but made the Blackout sampler
tests, which run thousands of steps, 13x slower: not used.)
"""

import atexit
import os
import shutil
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
