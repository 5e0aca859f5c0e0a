"""MD4 on text8 (character level, 27 symbols, sequences of 256), as in the MD4 paper.

Needs the text8 archive: `python -m md4.data.prepare text8 --out data` where the internet is
reachable, or copy text8.zip to data/.
"""

from md4 import config_lib


def get_config():
  c = config_lib.base()
  c.seq_len = 256
  c.vocab_size = 27
  c.data.update(dataset="text8", tokenizer="char", path="data/text8.zip")
  c.model.update(width=768, depth=12, num_heads=12, dropout=0.0, time_conditioning=False)
  c.diffusion.schedule = "linear"
  c.optimizer.update(lr=3e-4, warmup_steps=2000, schedule="cosine", min_lr_ratio=0.0,
                     weight_decay=0.03, b2=0.999, grad_clip=1.0)
  c.training.update(batch_size=512, num_steps=1_000_000, ema_decay=0.9999, log_every=100,
                    eval_every=10_000, checkpoint_every=5_000)
  c.eval.update(batch_size=512, num_batches=0, weights=("ema",))  # 0: the whole valid split
  c.sampling.update(every=50_000, num_samples=8, num_steps=256)
  return c
