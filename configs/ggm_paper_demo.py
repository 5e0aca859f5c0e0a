"""ggm_demo.py with the paper's GGM choices: K = 4 sweeps and unigram noise (see ggm_owt.py).

  python main.py --config=configs/ggm_paper_demo.py --workdir=runs/ggm_paper_demo
"""

from configs import ggm_demo


def get_config():
  c = ggm_demo.get_config()
  c.ggm.update(sweeps=4, noise="unigram")
  return c
