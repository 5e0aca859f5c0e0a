"""Entry points restart under tcmalloc where it is installed, and only then."""

import os
import subprocess
import sys

import pytest

from md4.training import tcmalloc

PRINT_PRELOAD = ("from md4.training import tcmalloc; tcmalloc.reexec(); import os; "
                 "print(os.environ.get('LD_PRELOAD', ''))")


def run(env: dict) -> str:
  env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
  out = subprocess.run([sys.executable, "-c", PRINT_PRELOAD], env=env, capture_output=True,
                       text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  return out.stdout.strip()


@pytest.mark.skipif(tcmalloc.library() is None, reason="tcmalloc is not installed here")
def test_reexec_preloads_tcmalloc_and_keeps_an_existing_preload():
  assert run({"LD_PRELOAD": None, "MD4_TCMALLOC": None}) == tcmalloc.library()
  assert run({"LD_PRELOAD": tcmalloc.library(), "MD4_TCMALLOC": None}) == tcmalloc.library()


def test_reexec_is_a_no_op_when_disabled():
  assert run({"LD_PRELOAD": None, "MD4_TCMALLOC": "0"}) == ""
