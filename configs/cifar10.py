"""MD4 on CIFAR-10 pixels: 3072 dimensions, 256 values each (mask id 256), bits per dimension.

The MD4 paper reaches 2.75 bits/dim at full scale. Data: the python-pickle archive
(data.path=data/cifar-10-python.tar.gz), or tfds `cifar10` where prepared (data.source=tfds,
data.path = its data_dir).
"""

from md4 import config_lib


def get_config():
  c = config_lib.base()
  c.model_type = "md4_pixels"
  c.data.update(dataset="cifar10", path="data/cifar-10-python.tar.gz")
  c.image_shape = (32, 32, 3)
  c.vocab_size = 256
  c.diffusion.schedule = "linear"
  c.unet.update(base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                attn_resolutions=(16,), dropout=0.1, embed_dim=32)
  c.optimizer.update(lr=2e-4, warmup_steps=5000, weight_decay=0.0, grad_clip=1.0)
  c.training.update(batch_size=128, num_steps=2_000_000, ema_decay=0.9999, log_every=100,
                    eval_every=10_000, checkpoint_every=10_000)
  c.eval.update(batch_size=128, num_batches=10, weights=("ema",))
  c.sampling.update(every=50_000, num_samples=64, num_steps=256)
  return c
