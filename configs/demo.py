"""Tiny character-level MD4 on Shakespeare's plays (offline corpus): minutes on a 2-core CPU.

  python main.py --config=configs/demo.py --workdir=runs/demo
"""

from md4 import config_lib
from md4.networks.matmul import cpu_has_amx


def get_config():
  c = config_lib.base()
  c.seq_len = 128
  # On CPUs with AMX the dense layers' products take bfloat16 operands (float32 accumulation):
  # 1.4x faster steps there.
  c.model.update(width=128, depth=4, num_heads=4, time_conditioning=False,
                 matmul_dtype="bfloat16" if cpu_has_amx() else "")
  # No time input, so the training NELBO can count masks instead of drawing t (lower variance).
  c.diffusion.train_estimator = "count"
  # Muon on the blocks' matrices (lr 0.007), AdamW at 6e-3 on embeddings, head and norms;
  # decoupled weight decay 0.1 on all matrices.
  c.optimizer.update(name="muon", muon_lr=0.007, lr=6e-3, warmup_steps=100, b2=0.99,
                     weight_decay=0.1)
  c.training.update(batch_size=16, num_steps=7500, ema_decay=0.998, log_every=100,
                    eval_every=2500, checkpoint_every=2500)
  c.eval.update(batch_size=64, num_batches=0)  # 0: the whole held-out split (3648 sequences)
  c.sampling.update(every=7500, num_samples=4, num_steps=128)
  return c
