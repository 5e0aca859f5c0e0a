"""GGM on text8 (character level, sequences of 256), MD4-sized network."""

from configs import text8


def get_config():
  c = text8.get_config()
  c.model_type = "ggm"
  c.model.time_conditioning = True
  c.ggm.update(sweeps=4, loss="soft")
  return c
