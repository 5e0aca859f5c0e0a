"""Tiny MD4 on Shakespeare's plays (offline corpus): minutes on a 2-core CPU.

  python main.py --config=configs/demo.py --workdir=runs/demo

The text is cleaned to the text8 alphabet and tokenized with 485 byte-pair merges learned from
the training split (`data.tokenizer=bpe`, 512 ids, about 2.8 characters per token; the merges
are saved as tokenizer.json in the workdir). Held-out figures are also reported per character.
`--config.data.tokenizer=char --config.vocab_size=27 --config.seq_len=128` trains on characters.
"""

from md4 import config_lib


def get_config():
  c = config_lib.base()
  c.data.tokenizer = "bpe"
  c.vocab_size = 512
  c.seq_len = 48  # tokens: about 134 characters
  # auto: on CPUs with AMX the dense layers' products take bfloat16 operands (float32
  # accumulation), 1.4x faster steps there; elsewhere float32. Resolved and logged at start.
  c.model.update(width=128, depth=4, num_heads=4, time_conditioning=False, matmul_dtype="auto")
  # A local branch beside attention (a zero-initialised depthwise convolution of 3 tokens) hands
  # every masked position its neighbours from the first step: MD4 leaves its unigram plateau
  # after ~250 steps instead of ~800 (docs/demo.md#the-early-plateau-and-the-local-branch).
  c.model.local_mix = 3
  # No time input, so the training NELBO can count masks instead of drawing t (lower variance).
  c.diffusion.train_estimator = "count"
  # Muon on the blocks' matrices (lr 0.007), AdamW at 6e-3 on embeddings, head and norms;
  # decoupled weight decay 0.1 on all matrices; cosine decay to zero.
  c.optimizer.update(name="muon", muon_lr=0.007, lr=6e-3, warmup_steps=100, b2=0.99,
                     weight_decay=0.1, min_lr_ratio=0.0)
  c.training.update(batch_size=32, num_steps=4000, ema_decay=0.998, log_every=100,
                    eval_every=2000, checkpoint_every=2000)
  c.eval.update(batch_size=64, num_batches=0)  # 0: the whole held-out split (3520 sequences)
  c.sampling.update(every=4000, num_samples=4, num_steps=48)
  return c
