"""ggm_demo.py with the paper's GGM choices: K = 4 sweeps, unigram noise and the binary
classification loss (`soft`, the lower-variance form of its hard-label BCE; see ggm_owt.py).

  python main.py --config=configs/ggm_paper_demo.py --workdir=runs/ggm_paper_demo
"""

from configs import ggm_demo


def get_config():
  c = ggm_demo.get_config()
  c.ggm.update(sweeps=4, noise="unigram", loss="soft")
  return c
