"""Tiny Blackout Diffusion on binarized MNIST for a 2-core CPU: minutes, a PNG sample grid.

  python -m md4.data.prepare mnist --out data
  python main.py --config=configs/blackout_demo.py --workdir=runs/blackout_demo
"""

from configs import blackout_mnist


def get_config():
  c = blackout_mnist.get_config()
  c.unet.update(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(7,),
                dropout=0.0)
  c.optimizer.update(lr=1e-3, warmup_steps=100)
  c.training.update(batch_size=32, num_steps=1500, ema_decay=0.99, log_every=100,
                    eval_every=500, checkpoint_every=500)
  c.eval.update(batch_size=100, num_batches=5, weights=("params", "ema"))
  c.sampling.update(every=1500, num_samples=36)
  return c
