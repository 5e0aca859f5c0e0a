"""Blackout Diffusion on CIFAR-10 (8-bit counts N = 255, t_end = 15, T = 1000).

Data and UNet as in cifar10.py: tfds `cifar10` where prepared (data.source=tfds, data.path = its
data_dir), or the python-pickle archive: data.path=data/cifar-10-python.tar.gz.
"""

from configs import cifar10


def get_config():
  c = cifar10.get_config()
  c.model_type = "blackout"
  c.blackout.update(num_steps=1000, t_end=15.0, max_count=255, weighting="instantaneous",
                    sampler="tau_leaping")
  c.training.num_steps = 800_000
  c.sampling.num_steps = 128  # unused: Blackout samples in blackout.num_steps
  return c
