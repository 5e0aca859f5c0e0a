"""MD4-S on OpenWebText: GPT-2-small-sized transformer, GPT-2 BPE, sequences of 1024.

Prepare the shards once: `python -m md4.data.prepare owt --out data/owt --seq_len 1024`.
"""

from md4 import config_lib


def get_config():
  c = config_lib.base()
  c.seq_len = 1024
  c.vocab_size = 50257
  c.data.update(dataset="owt", tokenizer="gpt2", path="data/owt")
  c.model.update(width=768, depth=12, num_heads=12, dropout=0.0, dtype="bfloat16",
                 time_conditioning=False)
  c.diffusion.schedule = "linear"
  c.optimizer.update(lr=3e-4, warmup_steps=2000, schedule="cosine", min_lr_ratio=0.0,
                     weight_decay=0.03, b1=0.9, b2=0.999, grad_clip=1.0)
  c.training.update(batch_size=512, num_steps=1_000_000, ema_decay=0.9999, log_every=100,
                    eval_every=10_000, checkpoint_every=5_000)
  c.eval.update(batch_size=512, num_batches=32, weights=("ema",))
  c.sampling.update(every=50_000, num_samples=8, num_steps=1024, top_p=0.0)
  c.mesh.update(data=-1, fsdp=1)
  return c
