"""The README's library example runs as printed, and its numbers mean what it says."""

import contextlib
import io
import os
import re

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRAWS = 500


def _run_example() -> tuple[str, dict]:
  readme = open(os.path.join(ROOT, "README.md")).read()
  code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
  out, namespace = io.StringIO(), {}
  with contextlib.redirect_stdout(out):
    exec(compile(code, "README.md", "exec"), namespace)
  return out.getvalue(), namespace


def test_readme_example_runs_and_its_estimators_average_to_minus_log_p():
  out, ns = _run_example()
  printed = re.search(r"bits per token: exact ([\d.]+), time estimator ([\d.]+), "
                      r"count estimator ([\d.]+)", out)
  exact, _, _ = (float(g) for g in printed.groups())
  calls = int(re.search(r"\(4, 64\) network calls: (\d+)", out).group(1))
  assert 1 <= calls <= 32  # at most min(num_steps, L)

  # Many draws of each estimator: both average to the exact -log p(x) of these x (the network
  # is the exact denoiser), and the count estimator's spread is about a fifth of the time
  # estimator's, as the README says. The time estimator's rare large 1/t weights make its
  # standard deviation unstable, so spread is the median distance from the exact value
  # (ratio 4.0-5.1 over six seeds of the keys).
  masked, x, V, L = ns["masked"], ns["x"], ns["V"], ns["L"]
  keys = jax.random.split(jax.random.key(0), DRAWS)
  spread = {}
  for estimator in ("time", "count"):
    nats = jax.jit(lambda keys, estimator=estimator: jax.lax.map(lambda rng: masked.nelbo(
        ns["logits_fn"], x, rng, ns["schedule"], vocab_size=V, estimator=estimator).mean(),
        keys))(keys)
    bits = np.asarray(nats, np.float64) / L / np.log(2)
    spread[estimator] = np.median(np.abs(bits - exact))
    assert abs(bits.mean() - exact) < 4 * bits.std() / np.sqrt(DRAWS) + 5e-4, estimator
  assert 3 < spread["time"] / spread["count"] < 7
