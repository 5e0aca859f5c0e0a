"""GGM on OpenWebText with a GPT-2-small-sized network and GPT-2 BPE (V = 50257).

The head is computed only at the queried position, so a step costs one V-wide head row.
"""

from configs import owt


def get_config():
  c = owt.get_config()
  c.model_type = "ggm"
  c.model.time_conditioning = True
  c.ggm.update(sweeps=2, loss="soft")
  return c
