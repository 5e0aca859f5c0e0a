"""Blackout Diffusion on binarized MNIST (N = 1, t_end = 10, T = 1000), as in the paper.

The full MNIST (60,000 training and 10,000 test digits) read from a prepared tfds data_dir
(`tfds build mnist --file_format=array_record --data_dir DIR` where TensorFlow and the internet
are available; then --config.data.path=DIR):

  python main.py --config=configs/blackout_mnist.py --workdir=runs/blackout_mnist \
      --config.data.path=DIR

configs/blackout_mnist5k.py is the same model on the 5k offline subset.
"""

from md4 import config_lib


def get_config():
  c = config_lib.base()
  c.model_type = "blackout"
  c.data.update(dataset="mnist", source="tfds", path="", binarize=True)
  c.image_shape = (28, 28, 1)
  c.vocab_size = 2  # counts 0..N
  c.blackout.update(num_steps=1000, t_end=10.0, max_count=1, weighting="instantaneous",
                    sampler="tau_leaping")
  c.unet.update(base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2,
                attn_resolutions=(7,), dropout=0.1)
  c.optimizer.update(lr=2e-4, warmup_steps=1000, weight_decay=0.0)
  c.training.update(batch_size=128, num_steps=100_000, ema_decay=0.9999, log_every=100,
                    eval_every=5000, checkpoint_every=5000)
  c.eval.update(batch_size=100, num_batches=5, weights=("ema",))
  c.sampling.update(every=10_000, num_samples=64)
  return c
