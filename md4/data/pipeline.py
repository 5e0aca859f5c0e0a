"""Training-facing data pipelines: deterministic, checkpointable grain iterators.

Every dataset becomes a random-access source of fixed-length int32[seq_len] sequences, split into
training and held-out sources. Training: shuffle(seed) -> repeat (each epoch reshuffled) -> batch
of `batch_size // process_count` rows; process p takes local batches p, p + P, p + 2P, ... so that
the P processes together see exactly the global batches a single process would see. The iterator's
state is a small JSON dict (`get_state()` / `set_state()`), saved with the checkpoint.

data_config fields:
  dataset: "text8" | "text_files" | "owt" | "tfds"
  tokenizer: "char" | "bpe" | "byte_bpe" | "gpt2" (owt needs "gpt2"; tokenizer_path: optional
             GPT-2 ranks file, or the bpe / byte_bpe tokenizer.json: read if it exists, else
             learned from the training split, vocab_size tokens, and written there; char and bpe
             clean the text to the text8 alphabet, byte_bpe reads it raw)
  path: text8 file/zip; text file, directory or glob; OWT shard directory; tfds data_dir
  eval_split: text8 held-out split, "valid" (default) or "test"
  holdout_fraction: text_files, the LAST fraction of the corpus is held out (default 0.1)
  tfds_name, tfds_train_split (default "train"), tfds_eval_split (default "validation"), text_key
  read_threads (default 2), prefetch (default 8): grain read options for training
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from etils import epath

from md4.data import corpora, owt, tokenizers

KNOWN_DATASETS = ("text8", "text_files", "owt", "tfds")


@dataclasses.dataclass
class Datasets:
  """What the trainer needs: an infinite training iterator and a repeatable held-out pass."""

  train: Iterator[dict]  # {"tokens": int32[local_batch, seq_len]}; get_state() / set_state()
  eval_batches: Callable[[], Iterable[dict]]  # same finite batches on every call
  tokenizer: Any  # encode / decode / vocab_size
  vocab_size: int
  info: dict = dataclasses.field(default_factory=dict)  # sequence and batch counts


class TokenChunks(Sequence):
  """Non-overlapping int32[seq_len] chunks of a 1-D token stream (the ragged tail is dropped)."""

  def __init__(self, stream: np.ndarray, seq_len: int):
    self.stream, self.seq_len = stream, seq_len

  def __len__(self) -> int:
    return len(self.stream) // self.seq_len

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < len(self):
      raise IndexError(index)
    start = index * self.seq_len
    return self.stream[start:start + self.seq_len].astype(np.int32)


def _compact(ids: np.ndarray, vocab_size: int) -> np.ndarray:
  """ids as uint8 or uint16, whichever holds the vocabulary."""
  return ids.astype(np.uint8 if vocab_size <= 256 else np.uint16)


def encode_stream(tokenizer, text: str, piece: int = 1 << 24) -> np.ndarray:
  """Encodes a long text into a compact 1-D token array (uint8 or uint16)."""
  if isinstance(tokenizer, tokenizers.CharTokenizer):  # per-character: pieces bound the memory
    parts = [_compact(tokenizer.encode(text[i:i + piece]), tokenizer.vocab_size)
             for i in range(0, len(text), piece)]
    return np.concatenate(parts) if parts else _compact(np.zeros(0), tokenizer.vocab_size)
  return _compact(tokenizer.encode(text), tokenizer.vocab_size)


def _documents_stream(tokenizer, texts: list[str]) -> np.ndarray:
  """GPT-2: each text followed by <|endoftext|>."""
  eot = np.array([tokenizer.eot_id], np.uint16)
  parts = [p for ids in tokenizer.encode_batch(texts) for p in (ids.astype(np.uint16), eot)]
  return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def _check_text(text: str, path: str) -> None:
  """Refuses binary data read as text: more than 1% NUL bytes or bytes that are not UTF-8."""
  bad = text.count("\x00") + text.count("\ufffd")
  if bad > 0.01 * len(text):
    raise ValueError(f"data.path {path} does not look like text: {bad} of its {len(text)} "
                     "characters are NUL bytes or not UTF-8")


def _text_splits(cfg, alphabet: bool, joined: bool) -> tuple[Any, Any, str]:
  """(train, held-out, description) for the text datasets: strings, or for GPT-2 on tfds lists
  of documents. With `alphabet` (char and bpe) the text is cleaned to the text8 alphabet and
  documents are joined by spaces; else with `joined` (byte_bpe) by blank lines."""
  dataset = cfg.get("dataset")
  path = cfg.get("path")
  if dataset == "text8":
    if not path:
      raise ValueError("data.path must name the text8 file or text8.zip for dataset 'text8'")
    splits = corpora.load_text8(path)
    eval_split = cfg.get("eval_split", "valid")
    if eval_split not in ("valid", "test"):
      raise ValueError(f"data.eval_split for text8 must be 'valid' or 'test', not {eval_split!r}")
    return splits["train"], splits[eval_split], f"text8 train / {eval_split}"
  if dataset == "text_files":
    if not path:
      raise ValueError("data.path must name a text file, directory or glob for 'text_files'")
    text = corpora.read_text_files(path)
    _check_text(text, path)
    if alphabet:
      text = corpora.clean_text8(text)
    fraction = cfg.get("holdout_fraction", 0.1)
    if not 0 < fraction < 1:
      raise ValueError(f"data.holdout_fraction must be in (0, 1), got {fraction}")
    cut = int(round(len(text) * (1 - fraction)))  # characters [0, cut) train, [cut, end) held out
    return (text[:cut], text[cut:],
            f"{path}: first {1 - fraction:.0%} train, last {fraction:.0%} held out")
  # tfds: read a prepared dataset without TensorFlow.
  import tensorflow_datasets as tfds

  name, key = cfg.get("tfds_name"), cfg.get("text_key", "text")
  if not name:
    raise ValueError("data.tfds_name must be set for dataset 'tfds'")
  splits = []
  for split in (cfg.get("tfds_train_split", "train"), cfg.get("tfds_eval_split", "validation")):
    source = tfds.data_source(name, split=split, data_dir=path)
    texts = [r[key].decode("utf-8") if isinstance(r[key], bytes) else str(r[key]) for r in source]
    if alphabet:
      texts = " ".join(corpora.clean_text8(t) for t in texts)
    elif joined:
      texts = "\n\n".join(texts)
    splits.append(texts)
  return splits[0], splits[1], f"tfds {name}"


def _text_tokenizer(cfg, train_text: Any, vocab_size: int | None, tokenizer_file: str | None,
                    process_index: int) -> tuple[tokenizers.Tokenizer, np.ndarray | None]:
  """The config's tokenizer, and the training text's ids when learning it produced them.

  `bpe` and `byte_bpe` are read from data.tokenizer_path (else `tokenizer_file`) if that file
  exists, else learned from the training text and written there (process 0).
  """
  name = cfg.get("tokenizer", "char")
  if name == "gpt2":
    return tokenizers.get_tokenizer("gpt2", ranks_path=cfg.get("tokenizer_path")), None
  if name not in tokenizers.LEARNED:
    return tokenizers.get_tokenizer(name), None
  path = cfg.get("tokenizer_path") or tokenizer_file
  if path and epath.Path(path).is_file():
    with _local_file(path, read=True) as local:
      return tokenizers.get_tokenizer(name, path=local), None
  if not vocab_size:
    raise ValueError(f"learning a {name} tokenizer needs its vocabulary size (vocab_size)")
  tokenizer, train_ids = tokenizers.LEARNED[name].learn_encoding(train_text, vocab_size)
  if path and process_index == 0:
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _local_file(path) as local:
      tokenizer.save(local)
  return tokenizer, train_ids


@contextlib.contextmanager
def _local_file(path: str, *, read: bool = False) -> Iterator[str]:
  """`path` itself when it is local; for a bucket (gs://) path a local temporary file, filled
  from the bucket (`read`) or else copied to it afterwards (tokenizers read and write local
  files only)."""
  if "://" not in path:
    yield path
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = epath.Path(tmp) / epath.Path(path).name
    if read:
      local.write_bytes(epath.Path(path).read_bytes())
    yield str(local)
    if not read:
      epath.Path(path).write_bytes(local.read_bytes())


def _owt_sources(cfg, tokenizer, seq_len: int) -> tuple[Sequence, Sequence, str]:
  """Packed OWT train / valid sources after checking seq_len and vocabulary against the config."""
  path = cfg.get("path")
  if not path:
    raise ValueError("data.path must name the prepared OWT shard directory for dataset 'owt'")
  meta = owt.read_meta(path)
  if meta["vocab_size"] != tokenizer.vocab_size or meta["tokenizer"] != cfg.get("tokenizer"):
    raise ValueError(
      f"Vocabulary mismatch: OWT shards in {path} use {meta['tokenizer']} "
      f"(vocab {meta['vocab_size']}), the config uses {cfg.get('tokenizer')} "
      f"(vocab {tokenizer.vocab_size})"
    )
  if meta["seq_len"] != seq_len:
    raise ValueError(
      f"seq_len mismatch: OWT shards in {path} hold sequences of {meta['seq_len']} tokens, "
      f"the config asks for {seq_len}; re-run `python -m md4.data.prepare owt --seq_len {seq_len}`"
    )
  return (owt.PackedSequences(path, "train"), owt.PackedSequences(path, "valid"),
          f"OWT shards {path}")


def _as_example(tokens: np.ndarray) -> dict:
  return {"tokens": tokens}


def process_batches(ds: grain.MapDataset, batch_size: int, process_index: int,
                    process_count: int) -> grain.MapDataset:
  """Global batches of `ds`, as the local rows of process p: local batches p, p + P, ..."""
  return (ds.batch(batch_size // process_count, drop_remainder=True)
          .slice(slice(process_index, None, process_count)))


def check_batches(batch_size: int, eval_batch_size: int | None, process_index: int,
                  process_count: int) -> int:
  """The global held-out batch size (default batch_size), after checking that both global
  batches split evenly over the processes and that process_index is one of them."""
  eval_batch_size = eval_batch_size or batch_size
  for name, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
    if size <= 0 or size % process_count:
      raise ValueError(f"{name} {size} is not a positive multiple of process_count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")
  return eval_batch_size


def read_options(data_config) -> grain.ReadOptions:
  """Reader threads and prefetch depth for the training iterator (data_config overrides)."""
  return grain.ReadOptions(num_threads=data_config.get("read_threads", 2),
                           prefetch_buffer_size=data_config.get("prefetch", 8))


def create_datasets(data_config, *, seq_len: int, batch_size: int, seed: int,
                    process_index: int = 0, process_count: int = 1,
                    eval_batch_size: int | None = None, vocab_size: int | None = None,
                    tokenizer_file: str | None = None) -> Datasets:
  """Builds the training iterator and held-out batches described by `data_config`.

  Args:
    data_config: ConfigDict (or dict) with the fields in the module docstring.
    seq_len: tokens per sequence.
    batch_size: GLOBAL batch size; this process yields batch_size // process_count rows.
    seed: shuffling seed (each epoch is reshuffled deterministically from it).
    process_index, process_count: this host's place among the data-loading processes.
    eval_batch_size: global held-out batch size (default batch_size); the ragged tail is dropped.
    vocab_size: the size of a bpe or byte_bpe vocabulary to learn.
    tokenizer_file: where a learned tokenizer is kept when data.tokenizer_path is unset.
  """
  dataset = data_config.get("dataset")
  if dataset not in KNOWN_DATASETS:
    raise ValueError(f"Unknown dataset {dataset!r}; known: {list(KNOWN_DATASETS)}")
  eval_batch_size = check_batches(batch_size, eval_batch_size, process_index, process_count)
  tok_name = data_config.get("tokenizer", "char")
  if tok_name not in tokenizers.TOKENIZERS:
    raise ValueError(f"Unknown tokenizer {tok_name!r}; known: {sorted(tokenizers.TOKENIZERS)}")

  info = {}
  if dataset == "owt":
    if tok_name in tokenizers.LEARNED:
      raise ValueError(f"data.tokenizer={tok_name} is for text8, text_files and tfds; OWT shards "
                       "hold GPT-2 tokens (data.tokenizer=gpt2)")
    tokenizer, _ = _text_tokenizer(data_config, None, None, None, process_index)
    train_src, eval_src, desc = _owt_sources(data_config, tokenizer, seq_len)
  else:
    alphabet = tok_name in ("char", "bpe")
    train_text, eval_text, desc = _text_splits(data_config, alphabet,
                                               joined=tok_name == "byte_bpe")
    tokenizer, learned_ids = _text_tokenizer(data_config, train_text, vocab_size,
                                             tokenizer_file, process_index)
    def stream(text: Any) -> np.ndarray:
      return (encode_stream(tokenizer, text) if isinstance(text, str)
              else _documents_stream(tokenizer, text))

    train_stream = (stream(train_text) if learned_ids is None  # learning encoded it already
                    else _compact(learned_ids, tokenizer.vocab_size))
    eval_stream = stream(eval_text)
    lengths = getattr(tokenizer, "token_lengths", None)  # characters or bytes per id
    if lengths is not None and len(train_stream):
      info["train_units_per_token"] = float(lengths[train_stream].sum()) / len(train_stream)
    for split, stream in (("training", train_stream), ("held-out", eval_stream)):
      if len(stream) < seq_len:
        raise ValueError(
          f"seq_len {seq_len} is longer than the {split} data of {desc} ({len(stream)} tokens)"
        )
    train_src, eval_src = TokenChunks(train_stream, seq_len), TokenChunks(eval_stream, seq_len)

  train = process_batches(grain.MapDataset.source(train_src).map(_as_example)
                          .shuffle(seed=seed % 2**32).repeat(),
                          batch_size, process_index, process_count)
  options = read_options(data_config)
  train_iter = iter(train.to_iter_dataset(options))

  num_eval_batches = len(eval_src) // eval_batch_size
  if num_eval_batches == 0:
    raise ValueError(
      f"The held-out data of {desc} has {len(eval_src)} sequences of {seq_len} tokens, fewer "
      f"than one eval batch of {eval_batch_size}; lower eval.batch_size or seq_len"
    )
  eval_ds = process_batches(grain.MapDataset.source(eval_src).map(_as_example)
                            .slice(slice(0, num_eval_batches * eval_batch_size)),
                            eval_batch_size, process_index, process_count)

  def eval_batches() -> Iterator[dict]:
    return iter(eval_ds.to_iter_dataset(options))

  info.update({"description": desc, "train_sequences": len(train_src),
               "eval_sequences": len(eval_src), "eval_batches": num_eval_batches,
               "local_batch_size": batch_size // process_count})
  return Datasets(train=train_iter, eval_batches=eval_batches, tokenizer=tokenizer,
                  vocab_size=tokenizer.vocab_size, info=info)
