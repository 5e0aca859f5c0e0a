"""OpenWebText preparation: GPT-2 tokens packed into fixed-length sequences in ArrayRecord shards.

Every document is tokenized with GPT-2 BPE and followed by `<|endoftext|>`; the token stream of
each split is cut into sequences of exactly `seq_len` tokens (the last partial one is dropped).
Each record of `{split}-{i:05d}-of-{n:05d}.array_record` is one sequence as little-endian uint16
bytes; `meta.json` records seq_len, vocabulary, tokenizer and counts. Document `i` is held out
(split "valid") when `floor((i + 1) f) > floor(i f)` for the hold-out fraction `f`: an exact,
evenly spread, deterministic fraction of the documents.
"""

from __future__ import annotations

import glob
import json
import math
import os
import pathlib
from collections.abc import Iterable, Iterator

import grain
import numpy as np
import tqdm

from md4.data import tokenizers

SPLITS = ("train", "valid")
OPENWEBTEXT_DOCUMENTS = 8_013_769  # Hugging Face `openwebtext`'s train split (for the ETA)
META_FILE = "meta.json"
DOC_SUFFIXES = (".txt", ".jsonl", ".json")


def iter_local_documents(source: str | os.PathLike, text_key: str = "text") -> Iterator[str]:
  """Yields documents from a file, directory or glob: each .txt file is one document, each line
  of a .jsonl file is one document (`{"text": ...}`)."""
  path = pathlib.Path(source)
  if path.is_file():
    files = [path]
  elif path.is_dir():
    files = sorted(p for p in path.iterdir() if p.suffix in DOC_SUFFIXES)
  else:
    files = sorted(pathlib.Path(p) for p in glob.glob(str(source), recursive=True))
  if not files:
    raise FileNotFoundError(f"No .txt/.jsonl documents match {str(source)!r}")
  for f in files:
    if f.suffix in (".jsonl", ".json"):
      with f.open(encoding="utf-8") as lines:
        for line in lines:
          if line.strip():
            yield json.loads(line)[text_key]
    else:
      yield f.read_text(encoding="utf-8", errors="replace")


def iter_hf_openwebtext() -> Iterator[str]:
  """Yields Hugging Face `openwebtext` documents (needs `pip install datasets` and the internet)."""
  import datasets  # Optional dependency, imported only when used.

  for example in datasets.load_dataset("openwebtext", split="train"):
    yield example["text"]


def is_heldout(index: int, fraction: float) -> bool:
  """Whether document `index` belongs to the held-out split (exactly `fraction` of documents)."""
  return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def _shard_name(split: str, i: int, n: int) -> str:
  return f"{split}-{i:05d}-of-{n:05d}.array_record"


class _SplitWriter:
  """Packs one split's token stream into seq_len records, rolling over shards of shard_size."""

  def __init__(self, out_dir: pathlib.Path, split: str, seq_len: int, shard_size: int):
    self.out_dir, self.split, self.seq_len, self.shard_size = out_dir, split, seq_len, shard_size
    self.pending: list[np.ndarray] = []
    self.pending_len = 0
    self.parts: list[pathlib.Path] = []
    self.writer = None
    self.in_shard = 0
    self.documents = self.sequences = 0

  def add_document(self, ids: np.ndarray, eot_id: int) -> None:
    self.documents += 1
    self.pending += [ids.astype(np.uint16), np.array([eot_id], np.uint16)]
    self.pending_len += len(ids) + 1
    if self.pending_len >= self.seq_len:
      stream = np.concatenate(self.pending)
      full = len(stream) // self.seq_len * self.seq_len
      for seq in stream[:full].reshape(-1, self.seq_len):
        self._write(seq)
      self.pending, self.pending_len = [stream[full:]], len(stream) - full

  def _write(self, seq: np.ndarray) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    if self.writer is None:
      self.parts.append(self.out_dir / f"{self.split}-{len(self.parts):05d}.part")
      self.writer = ArrayRecordWriter(str(self.parts[-1]), "group_size:1")
      self.in_shard = 0
    self.writer.write(seq.astype("<u2").tobytes())
    self.sequences += 1
    self.in_shard += 1
    if self.in_shard == self.shard_size:
      self.writer.close()
      self.writer = None

  def finish(self) -> dict:
    """Closes the last shard, gives shards their final names and returns the split's counts."""
    if self.writer is not None:
      self.writer.close()
    n = len(self.parts)
    for i, part in enumerate(self.parts):
      part.rename(self.out_dir / _shard_name(self.split, i, n))
    return {"documents": self.documents, "sequences": self.sequences,
            "tokens": self.sequences * self.seq_len, "dropped_tokens": self.pending_len,
            "shards": n}


def prepare_owt(out_dir: str | os.PathLike, *, seq_len: int = 1024,
                source: str | os.PathLike | None = None, holdout_fraction: float = 0.0005,
                shard_size: int = 65536, documents: Iterable[str] | None = None,
                tokenizer: tokenizers.GPT2Tokenizer | None = None, batch_docs: int = 256) -> dict:
  """Tokenizes, packs and writes OpenWebText (or local documents) to `out_dir`; returns the meta.

  Documents come from `documents` if given, else the local `source` (see iter_local_documents),
  else Hugging Face `openwebtext`. Idempotent: an existing meta.json with the same seq_len is kept.
  """
  out = pathlib.Path(out_dir)
  if (out / META_FILE).is_file():
    meta = read_meta(out)
    if meta["seq_len"] != seq_len:
      raise ValueError(f"{out} already holds seq_len {meta['seq_len']} shards, not {seq_len}")
    return meta
  tok = tokenizer or tokenizers.GPT2Tokenizer()
  out.mkdir(parents=True, exist_ok=True)
  writers = {s: _SplitWriter(out, s, seq_len, shard_size) for s in SPLITS}
  index = tokens = 0

  def flush(batch: list[str]) -> None:
    nonlocal index, tokens
    for ids in tok.encode_batch(batch):
      split = "valid" if is_heldout(index, holdout_fraction) else "train"
      writers[split].add_document(ids, tok.eot_id)
      index, tokens = index + 1, tokens + len(ids) + 1

  total = OPENWEBTEXT_DOCUMENTS if source is None and documents is None else None
  if documents is None:
    documents = iter_hf_openwebtext() if source is None else iter_local_documents(source)
  batch = []
  # A progress bar on stderr (documents/s, tokens/s, and the ETA for openwebtext); none when
  # stderr is not a terminal.
  with tqdm.tqdm(documents, total=total, desc="owt", unit=" docs", disable=None) as bar:
    for doc in bar:
      batch.append(doc)
      if len(batch) == batch_docs:
        flush(batch)
        batch = []
        rate = tokens / max(bar.format_dict["elapsed"], 1e-9)
        bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
    flush(batch)
  meta = {"seq_len": seq_len, "vocab_size": tok.vocab_size, "tokenizer": "gpt2",
          "eot_id": tok.eot_id, "dtype": "uint16", "holdout_fraction": holdout_fraction,
          "source": "openwebtext" if source is None else str(source),
          "splits": {s: w.finish() for s, w in writers.items()}}
  (out / META_FILE).write_text(json.dumps(meta, indent=2))
  return meta


def read_meta(directory: str | os.PathLike) -> dict:
  """Reads meta.json of a prepared shard directory."""
  path = pathlib.Path(directory) / META_FILE
  if not path.is_file():
    raise FileNotFoundError(
      f"No {META_FILE} in {directory}: not a prepared OWT directory "
      f"(run `python -m md4.data.prepare owt --out {directory}`)"
    )
  return json.loads(path.read_text())


class PackedSequences:
  """Random-access source of int32[seq_len] sequences from one split's ArrayRecord shards."""

  def __init__(self, directory: str | os.PathLike, split: str):
    self.meta = read_meta(directory)
    self.seq_len = self.meta["seq_len"]
    n = self.meta["splits"][split]["shards"] if split in self.meta["splits"] else 0
    paths = [str(pathlib.Path(directory) / _shard_name(split, i, n)) for i in range(n)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
      raise FileNotFoundError(
        f"Split {split!r} of {directory} has no sequences or missing shards {missing[:3]}"
      )
    self._source = grain.sources.ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> np.ndarray:
    return np.frombuffer(self._source[index], "<u2").astype(np.int32)  # [seq_len]
