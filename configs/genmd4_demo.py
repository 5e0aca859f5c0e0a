"""Tiny GenMD4 (learned state-dependent masking) on Shakespeare: the CPU companion of demo.py.

Its RLOO gradient draws two masks per sequence (two network passes per step), so it takes half
of demo.py's steps for the same wall clock.

  python main.py --config=configs/genmd4_demo.py --workdir=runs/genmd4_demo
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.model_type = "genmd4"
  c.training.num_steps //= 2
  c.sampling.every = c.training.num_steps
  return c
