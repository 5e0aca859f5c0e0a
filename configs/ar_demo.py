"""Tiny autoregressive reference model on Shakespeare (same data and network size as demo.py).

Its exact held-out bits per character put the diffusion models' NELBOs in context, and it scores
their samples (generative perplexity).

  python main.py --config=configs/ar_demo.py --workdir=runs/ar_demo
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.model_type = "ar"
  return c
