"""GGM on OpenWebText with a GPT-2-small-sized network and GPT-2 BPE (V = 50257).

The paper's choices (Varma et al., ICLR 2025; its text was not readable here, so these come from
secondary sources): T = 4096 steps at L = 1024, that is K = 4 sweeps (T is reported, K = T / L
is inferred), and noise drawn from the data's unigram distribution (reported by secondary
sources; here the training split's token frequencies, docs/methods.md §3). Not the paper's: the
network (GPT-2 small here; the paper's is 387M parameters), the schedule (linear, as MD4) and the
loss (soft, the lower-variance equivalent of the paper's hard-label BCE, same minimiser).
The head is computed only at the queried position, so a step costs one V-wide head row.
"""

from configs import owt


def get_config():
  c = owt.get_config()
  c.model_type = "ggm"
  c.model.time_conditioning = True
  c.ggm.update(sweeps=4, loss="soft", noise="unigram")
  return c
