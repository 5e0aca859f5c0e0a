"""Tiny Glauber Generative Model on Shakespeare: the CPU companion of demo.py.

One training example supervises one position, so GGM needs more steps than MD4 for the same
number of supervised tokens; sampling makes K * seq_len network calls. The loss is `ce` (the
reverse kernel's cross-entropy, docs/methods.md §3): at 600 steps it reached 2.944 / 2.974
held-out bits/char (seeds 0 / 1) against 3.261 / 3.212 for the paper's binary classification
(`soft`), and its minimiser gives the exact sampler too (docs/ggm.md).

  python main.py --config=configs/ggm_demo.py --workdir=runs/ggm_demo
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.model_type = "ggm"
  c.model.time_conditioning = True
  c.ggm.update(sweeps=2, loss="ce")
  return c
