"""Tokenizers: text8 characters (27 ids), byte-pair merges learned over the text8 alphabet
(`bpe`, any vocabulary size above 27) and GPT-2 byte-level BPE (50257 ids).

All expose `encode(str) -> int32[N]`, `decode(ids) -> str` and `vocab_size`; the first two also
`token_lengths` (characters per id, for bits per character). Ids outside the vocabulary (the
diffusion mask id `V`, for example) decode to a visible placeholder.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_GPT2_RANKS = REPO_ROOT / "data" / "gpt2.tiktoken"
GPT2_RANKS_ENV = "MD4_GPT2_RANKS"
# GPT-2's pre-tokenisation pattern (equivalent to the original release's, as used by tiktoken).
GPT2_PATTERN = (
  r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
ENDOFTEXT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_HELLO_WORLD = [15496, 995]  # GPT-2 ids of "Hello world", used to verify a ranks file.


class CharTokenizer:
  """The text8 alphabet: 'a'..'z' -> 0..25, ' ' -> 26."""

  alphabet = "abcdefghijklmnopqrstuvwxyz "
  vocab_size = 27
  placeholder = "_"

  def __init__(self):
    self._lookup = np.full(256, -1, np.int32)  # byte value -> id, -1 if not in the alphabet
    for i, c in enumerate(self.alphabet):
      self._lookup[ord(c)] = i
    self._chars = np.array(list(self.alphabet))
    self.token_lengths = np.ones(self.vocab_size, np.int32)

  def encode(self, text: str) -> np.ndarray:
    """Encodes text8-alphabet text to int32[len(text)]; any other character is a ValueError."""
    raw = np.frombuffer(text.encode("utf-8"), np.uint8)
    ids = self._lookup[raw]
    if len(raw) != len(text) or (ids < 0).any():
      bad = sorted({c for c in text if c not in self.alphabet})
      raise ValueError(
        f"CharTokenizer accepts only a-z and space (clean the text with clean_text8); "
        f"found {bad[:10]}"
      )
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes ids; ids outside 0..26 (e.g. the mask id 27) become '_'."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    ok = (ids >= 0) & (ids < self.vocab_size)
    chars = np.where(ok, self._chars[np.where(ok, ids, 0)], self.placeholder)
    return "".join(chars.tolist())


def _merge_pair(ids: np.ndarray, a: int, b: int, new: int) -> np.ndarray:
  """ids with every occurrence of the pair (a, b) replaced by `new`, left to right."""
  hits = np.flatnonzero((ids[:-1] == a) & (ids[1:] == b))
  if a == b and len(hits) > 1:
    # In a run like "aaa" the pair starts at consecutive positions: keep every other one.
    starts = np.concatenate([[True], hits[1:] != hits[:-1] + 1])
    first = np.maximum.accumulate(np.where(starts, np.arange(len(hits)), 0))
    hits = hits[(np.arange(len(hits)) - first) % 2 == 0]
  keep = np.ones(len(ids), bool)
  keep[hits + 1] = False
  out = ids.copy()
  out[hits] = new
  return out[keep]


class BPETokenizer:
  """Byte-pair merges over the text8 alphabet: ids 0..26 are CharTokenizer's, id 27 + i is merge
  i, the concatenation of an earlier pair of ids (it may span a space).

  `learn(text, vocab_size)` takes the most frequent adjacent pair vocab_size - 27 times (ties to
  the smallest pair of ids; a run "aaa" counts two pairs and merges once); `encode` cleans
  nothing (text8-alphabet text only, like CharTokenizer) and applies the merges in order.
  """

  placeholder = "_"

  def __init__(self, merges: Sequence[tuple[int, int]]):
    self.chars = CharTokenizer()
    self.merges = [(int(a), int(b)) for a, b in merges]
    pieces = list(CharTokenizer.alphabet)
    for a, b in self.merges:
      if not (0 <= a < len(pieces) and 0 <= b < len(pieces)):
        raise ValueError(f"BPE merge {len(pieces) - 27} ({a}, {b}) names an id not defined yet")
      pieces.append(pieces[a] + pieces[b])
    self.pieces = pieces
    self.vocab_size = len(pieces)
    self.token_lengths = np.array([len(p) for p in pieces], np.int32)

  @classmethod
  def learn(cls, text: str, vocab_size: int) -> BPETokenizer:
    """Learns vocab_size - 27 merges from text8-alphabet text."""
    return cls.learn_encoding(text, vocab_size)[0]

  @classmethod
  def learn_encoding(cls, text: str, vocab_size: int) -> tuple[BPETokenizer, np.ndarray]:
    """`learn`, and the text's ids under the learned merges (which learning computes anyway:
    the same as `encode(text)`)."""
    base = CharTokenizer.vocab_size
    if vocab_size <= base:
      raise ValueError(f"a BPE vocabulary must be larger than the {base} characters, "
                       f"got {vocab_size}")
    ids, merges = CharTokenizer().encode(text), []
    for new in range(base, vocab_size):
      counts = np.bincount(ids[:-1].astype(np.int64) * new + ids[1:], minlength=new * new)
      best = int(counts.argmax())
      if counts[best] < 2:
        raise ValueError(f"the text has too few repeated pairs for a {vocab_size}-token BPE "
                         f"vocabulary (it stops at {new})")
      merges.append(divmod(best, new))
      ids = _merge_pair(ids, *merges[-1], new)
    return cls(merges), ids

  @classmethod
  def load(cls, path: str) -> BPETokenizer:
    """A tokenizer saved by `save`."""
    with open(path) as f:
      try:
        saved = json.load(f)
      except json.JSONDecodeError:
        saved = {}
    if (not isinstance(saved, dict) or saved.get("alphabet") != CharTokenizer.alphabet
        or "merges" not in saved):
      raise ValueError(f"{path} is not a BPE tokenizer file over the text8 alphabet")
    return cls(saved["merges"])

  def save(self, path: str) -> None:
    """Writes the merges as JSON (atomically: a reader never sees half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump({"alphabet": CharTokenizer.alphabet, "merges": self.merges}, f)
    os.replace(tmp, path)

  def encode(self, text: str) -> np.ndarray:
    """Encodes text8-alphabet text to int32[N]; any other character is a ValueError."""
    ids = self.chars.encode(text)
    for i, (a, b) in enumerate(self.merges):
      ids = _merge_pair(ids, a, b, CharTokenizer.vocab_size + i)
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes ids; ids outside the vocabulary (e.g. the mask id) become '_'."""
    return "".join(self.pieces[i] if 0 <= i < self.vocab_size else self.placeholder
                   for i in np.asarray(ids, np.int64).reshape(-1).tolist())


def _find_gpt2_ranks(ranks_path: str | None) -> pathlib.Path | None:
  """Explicit path, else $MD4_GPT2_RANKS, else data/gpt2.tiktoken in the repo, else None."""
  for candidate in (ranks_path, os.environ.get(GPT2_RANKS_ENV)):
    if candidate:
      path = pathlib.Path(candidate)
      if not path.is_file():
        raise FileNotFoundError(f"GPT-2 ranks file not found: {path}")
      return path
  return DEFAULT_GPT2_RANKS if DEFAULT_GPT2_RANKS.is_file() else None


class GPT2Tokenizer:
  """GPT-2 BPE through tiktoken, built from a local ranks file when one is available.

  Lookup order for the ranks file: `ranks_path`, $MD4_GPT2_RANKS, `data/gpt2.tiktoken` under the
  repository (`python -m md4.data.prepare gpt2`), else `tiktoken.get_encoding("gpt2")`, which
  downloads the file and so needs the internet.
  """

  vocab_size = 50257
  eot_id = GPT2_EOT_ID
  placeholder = "[MASK]"

  def __init__(self, ranks_path: str | None = None):
    import tiktoken
    import tiktoken.load

    path = _find_gpt2_ranks(ranks_path)
    if path is None:
      self.encoding = tiktoken.get_encoding("gpt2")
    else:
      self.encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(path)),
        special_tokens={ENDOFTEXT: GPT2_EOT_ID},
        explicit_n_vocab=self.vocab_size,
      )
    self.ranks_path = path

  def encode(self, text: str) -> np.ndarray:
    """Encodes text as int32[N]; '<|endoftext|>' in the text is treated as plain text."""
    return np.asarray(self.encoding.encode_ordinary(text), np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes many texts (multithreaded in tiktoken)."""
    return [np.asarray(t, np.int32) for t in self.encoding.encode_ordinary_batch(list(texts))]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes ids; ids outside 0..50256 (e.g. the mask id 50257) become '[MASK]'."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    pieces, run = [], []
    for i in ids.tolist():
      if 0 <= i < self.vocab_size:
        run.append(i)
        continue
      if run:
        pieces.append(self.encoding.decode(run))
        run = []
      pieces.append(self.placeholder)
    if run:
      pieces.append(self.encoding.decode(run))
    return "".join(pieces)


TOKENIZERS = {"char": CharTokenizer, "bpe": BPETokenizer.load, "gpt2": GPT2Tokenizer}
Tokenizer = CharTokenizer | BPETokenizer | GPT2Tokenizer


def get_tokenizer(name: str, **kw) -> Tokenizer:
  """The tokenizer registered under `name`: "char", "gpt2" (ranks_path=...) or "bpe" (a file
  saved by BPETokenizer.save as path=...)."""
  if name not in TOKENIZERS:
    raise ValueError(f"Unknown tokenizer {name!r}; known: {sorted(TOKENIZERS)}")
  return TOKENIZERS[name](**kw)
