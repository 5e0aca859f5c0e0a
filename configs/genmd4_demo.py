"""Tiny GenMD4 (learned state-dependent masking) on Shakespeare: the CPU companion of demo.py.

  python main.py --config=configs/genmd4_demo.py --workdir=runs/genmd4_demo
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.model_type = "genmd4"
  return c
