"""Tokenizers: text8 characters (27 ids) and GPT-2 byte-level BPE (50257 ids).

Both expose `encode(str) -> int32[N]`, `decode(ids) -> str` and `vocab_size`. Ids outside the
vocabulary (the diffusion mask id `V`, for example) decode to a visible placeholder.
"""

from __future__ import annotations

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


TOKENIZERS = {"char": CharTokenizer, "gpt2": GPT2Tokenizer}


def get_tokenizer(name: str, **kw) -> CharTokenizer | GPT2Tokenizer:
  """Returns the tokenizer registered under `name` ("char" or "gpt2")."""
  if name not in TOKENIZERS:
    raise ValueError(f"Unknown tokenizer {name!r}; known: {sorted(TOKENIZERS)}")
  return TOKENIZERS[name](**kw)
