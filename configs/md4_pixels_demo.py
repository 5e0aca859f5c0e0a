"""Tiny MD4 on mnist5k digits as 8-bit pixels (256 values, bits per dimension), for a CPU.

  python -m md4.data.prepare mnist5k --out data
  python main.py --config=configs/md4_pixels_demo.py --workdir=runs/md4_pixels_demo
"""

from configs import blackout_demo


def get_config():
  c = blackout_demo.get_config()
  c.model_type = "md4_pixels"
  c.data.binarize = False
  c.vocab_size = 256
  c.unet.embed_dim = 16
  c.sampling.update(num_samples=16, num_steps=64)
  return c
