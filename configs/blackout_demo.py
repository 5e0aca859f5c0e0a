"""Tiny Blackout Diffusion on binarized mnist5k (5k MNIST digits) for a 2-core CPU: ~10 minutes,
a PNG sample grid.

N = 1, t_end = 10 as in the paper, but T = 500 steps (training grid and tau-leaping sampler), a
16-channel UNet and 3,000 steps at batch 32; see README (Images) for the result.

  python -m md4.data.prepare mnist5k --out data
  python main.py --config=configs/blackout_demo.py --workdir=runs/blackout_demo
  python main.py --config=configs/blackout_demo.py --workdir=runs/blackout_demo --mode=sample
"""

from configs import blackout_mnist5k


def get_config():
  c = blackout_mnist5k.get_config()
  c.blackout.update(num_steps=500)
  c.unet.update(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(7,),
                dropout=0.0)
  c.optimizer.update(lr=1e-3, warmup_steps=100)
  c.training.update(batch_size=32, num_steps=3000, ema_decay=0.995, log_every=100,
                    eval_every=1000, checkpoint_every=1000)
  c.eval.update(batch_size=100, num_batches=5, weights=("params", "ema"))
  c.sampling.update(every=3000, num_samples=36)
  return c
