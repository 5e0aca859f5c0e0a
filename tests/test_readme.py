"""The README's library example runs as printed."""

import contextlib
import io
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_example_runs():
  readme = open(os.path.join(ROOT, "README.md")).read()
  code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, "README.md", "exec"), {})
  bits = float(re.search(r"bits per token: ([\d.]+)", out.getvalue()).group(1))
  # Zero-initialised head: uniform over 27 symbols, log2(27) bits; one estimate has sd 0.16.
  assert abs(bits - 4.755) < 0.5
  assert "(4, 64) network calls: " in out.getvalue()
