"""Class-conditional MD4 on Fashion-MNIST 8-bit pixels (60,000 train, 10,000 test images), for a
CPU: md4_pixels_demo.py's UNet conditioned on the 10 classes, with 10% of the training labels
replaced by the null class so that one network also gives the unconditional model that
classifier-free guidance needs.

  python -m md4.data.prepare fashion_mnist --out data
  python main.py --config=configs/md4_pixels_fashion_cond.py --workdir=runs/fashion_cond
  python -m md4.tools.class_grid runs/fashion_cond --guidance 0,2 --out grid.png
"""

from configs import md4_pixels_demo


def get_config():
  c = md4_pixels_demo.get_config()
  c.data.update(dataset="fashion_mnist", source="npy", path="data/fashion_mnist")
  c.unet.num_classes_cond = 10
  c.diffusion.label_dropout = 0.1
  c.sampling.class_label = 0
  return c
