"""Tokenizers: text8 characters (27 ids), byte-pair merges learned from a run's text, over the
text8 alphabet (`bpe`, any vocabulary size above 27) or over the bytes of raw text (`byte_bpe`,
above 256), both through Hugging Face `tokenizers`, and GPT-2's BPE (50257 ids, through tiktoken).

All expose `encode(str) -> int32[N]`, `decode(ids) -> str` and `vocab_size`; all but GPT-2's also
`token_lengths` (the `unit`s, characters or bytes, each id spells: bits per character or byte).
Ids outside the vocabulary (the diffusion mask id `V`, for example) decode to a visible
placeholder.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import pathlib
import re
from collections.abc import Iterator, Sequence

import numpy as np
import regex
import tokenizers as hf_tokenizers

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
  unit = "char"
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


_PIECE_CHARS = 1 << 20  # characters per piece of text handed to Hugging Face tokenizers
# Pieces for the BPE trainer: many small ones spread its word counting over the cores.
_LEARN_PIECE_CHARS = 1 << 14
OLD_FORMAT = ("{path} holds merges by id, the format of md4's numpy BPE before it used Hugging "
              "Face tokenizers; this version reads only tokenizer.json files: learn the tokenizer "
              "again in a new workdir (or use an older md4 for this one)")


def _cut(text: str, size: int = _PIECE_CHARS) -> Iterator[tuple[str, np.ndarray]]:
  """text8-alphabet text in pieces of about `size` characters, each cut just before a space so
  that the pieces' words are the text's words, with their CharTokenizer ids; any other character
  is CharTokenizer's error."""
  chars, start = CharTokenizer(), 0
  while start < len(text):
    cut = text.find(" ", start + size)
    cut = len(text) if cut < 0 else cut
    piece = text[start:cut]
    yield piece, chars.encode(piece)
    start = cut


def _pieces(text: str, size: int = _PIECE_CHARS) -> Iterator[str]:
  """The pieces of `_cut`."""
  return (piece for piece, _ in _cut(text, size))


# Word codes: a word of at most _CODE_DIGITS characters is the number whose base-28 digit k is its
# k-th character's id + 1 (its leading space is id 26); longer words are numbered from _LONG_WORD.
_CODE_DIGITS = 13
_LONG_WORD = 28 ** _CODE_DIGITS  # < 2^63
_CODE_ASCII = np.frombuffer(b"\0" + CharTokenizer.alphabet.encode(), np.uint8)  # digit -> byte


_POWERS = 28 ** np.arange(_CODE_DIGITS, dtype=np.int64)


def _piece_codes(piece: str, ids: np.ndarray) -> tuple[np.ndarray, list[tuple[int, str]]]:
  """The codes of a piece's words (a new word before each space; -1 for a long word) and its
  long words with their places."""
  digits = ids.astype(np.int64) + 1
  is_start = digits == 27
  is_start[0] = True
  starts = np.flatnonzero(is_start)
  lengths = np.diff(starts, append=len(digits))
  position = np.arange(len(digits)) - np.repeat(starts, lengths)
  weight = np.where(position < _CODE_DIGITS, _POWERS[np.minimum(position, _CODE_DIGITS - 1)], 0)
  code = np.add.reduceat(digits * weight, starts)
  long = np.flatnonzero(lengths > _CODE_DIGITS)
  code[long] = -1
  return code, [(j, piece[starts[j]:starts[j] + lengths[j]]) for j in long.tolist()]


def _text8_word_index(text: str) -> tuple[list[str], np.ndarray]:
  """The distinct words of text8-alphabet text (a new word before each space) and, for each word
  of the text, its number among them: numpy on word codes, no Python loop over words, its
  pieces on all cores (numpy releases the GIL)."""
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    pieces = list(pool.map(lambda cut: _piece_codes(*cut), _cut(text)))
    long_words: dict = {}
    for code, long in pieces:
      for j, word in long:
        code[j] = _LONG_WORD + long_words.setdefault(word, len(long_words))
    codes = [code for code, _ in pieces] or [np.zeros(0, np.int64)]
    distinct = np.sort(np.concatenate(codes))  # np.unique with its inverse is slower here
    distinct = distinct[np.diff(distinct, prepend=-1) != 0]
    occurrences = np.concatenate(list(pool.map(lambda c: np.searchsorted(distinct, c), codes)))
  short = distinct[distinct < _LONG_WORD]
  spelled = _CODE_ASCII[(short[:, None] // _POWERS) % 28]  # [words, 13] bytes, NUL-padded
  words = [w.decode() for w in np.ascontiguousarray(spelled).view(f"S{_CODE_DIGITS}").ravel()]
  return words + list(long_words), occurrences


# The pattern of Hugging Face's ByteLevel pre-tokenizer (GPT-2's, with its contractions spelled
# out), for `regex`: splitting a text with it first lets encode meet each distinct word once.
_GPT2_WORDS = regex.compile(
  r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
# A space between two characters that are not whitespace: GPT-2's pre-tokenisation pattern always
# ends a piece before it (the space starts the next one), so text cut there splits the same way.
_WORD_START = re.compile(r"(?<=\S) (?=\S)")


def _byte_pieces(text: str, size: int = _PIECE_CHARS) -> Iterator[str]:
  """Raw text in pieces of about `size` characters, each cut at a `_WORD_START` space."""
  start = 0
  while start < len(text):
    found = _WORD_START.search(text, start + size)
    cut = found.start() if found else len(text)
    yield text[start:cut]
    start = cut


def byte_symbols() -> list[str]:
  """GPT-2's byte-level alphabet, as Hugging Face's ByteLevel pre-tokenizer writes bytes: byte b
  is one printable character, itself for the printable Latin-1 bytes, else chr(256 + k) for the
  k-th of the others."""
  printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)}
  others = iter(range(256, 512))
  return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


class BPETokenizer:
  """Byte-pair merges over the text8 alphabet, through Hugging Face `tokenizers`: ids 0..26 are
  CharTokenizer's, later ids the merged pieces in the order they were first made.

  Text is split into words before each space (" the" is a word, a merge never spans two words).
  `learn(text, vocab_size)` runs `tokenizers`' BPE trainer: the most frequent adjacent pair in the
  words, vocab_size - 27 new pieces (a run "aaa" counts two pairs and merges once; ties are the
  trainer's); `encode` cleans nothing (text8-alphabet text only, like CharTokenizer) and applies
  the merges in order. `save` writes a standard tokenizer.json.
  """

  base: Sequence[str] = CharTokenizer.alphabet  # the pieces of ids 0, 1, ...
  base_name = "the 27 characters"
  alphabet_name = "the text8 alphabet"
  unit = "char"  # what token_lengths count
  placeholder = "_"

  def __init__(self, merges: Sequence[tuple[int, int]]):
    self.merges = [(int(a), int(b)) for a, b in merges]
    pieces = list(self.base)
    ids = {p: i for i, p in enumerate(pieces)}
    for a, b in self.merges:
      if not (0 <= a < len(pieces) and 0 <= b < len(pieces)):
        raise ValueError(f"BPE merge ({a}, {b}) names an id not defined yet")
      if pieces[a] + pieces[b] not in ids:
        ids[pieces[a] + pieces[b]] = len(pieces)
        pieces.append(pieces[a] + pieces[b])
    self.pieces = pieces
    self.vocab_size = len(pieces)
    self.token_lengths = np.array([len(p) for p in pieces], np.int32)  # a symbol is one unit
    self.hf = self._hf(hf_tokenizers.models.BPE(
      vocab=ids, merges=[(pieces[a], pieces[b]) for a, b in self.merges]))

  @staticmethod
  def _hf(model: hf_tokenizers.models.Model) -> hf_tokenizers.Tokenizer:
    """A Hugging Face tokenizer of `model` that splits text into words before each space."""
    tokenizer = hf_tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.Split(" ", "merged_with_next")
    tokenizer.decoder = hf_tokenizers.decoders.Fuse()
    return tokenizer

  _training_pieces = staticmethod(functools.partial(_pieces, size=_LEARN_PIECE_CHARS))

  @classmethod
  def _from_string_merges(cls, merges: Sequence[Sequence[str]]) -> BPETokenizer:
    """The tokenizer of merges given as pairs of pieces (tokenizer.json's form)."""
    ids = {c: i for i, c in enumerate(cls.base)}
    pairs = []
    for a, b in merges:
      if a not in ids or b not in ids:
        raise ValueError(f"BPE merge ({a!r}, {b!r}) names a piece not defined yet")
      pairs.append((ids[a], ids[b]))
      ids.setdefault(a + b, len(ids))
    return cls(pairs)

  @classmethod
  def learn(cls, text: str, vocab_size: int) -> BPETokenizer:
    """Learns merges from the text until there are vocab_size ids."""
    if vocab_size <= len(cls.base):
      raise ValueError(f"a BPE vocabulary must be larger than {cls.base_name}, got {vocab_size}")
    hf = cls._hf(hf_tokenizers.models.BPE())
    trainer = hf_tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2, special_tokens=[],
      initial_alphabet=list(cls.base), show_progress=False)
    hf.train_from_iterator(cls._training_pieces(text), trainer)
    learned = cls._from_string_merges(json.loads(hf.to_str())["model"]["merges"])
    if learned.vocab_size < vocab_size:
      raise ValueError(f"the text has too few repeated pairs for a {vocab_size}-token BPE "
                       f"vocabulary (it stops at {learned.vocab_size})")
    return learned

  @classmethod
  def learn_encoding(cls, text: str, vocab_size: int) -> tuple[BPETokenizer, np.ndarray]:
    """`learn`, and the text's ids under the learned merges."""
    tokenizer = cls.learn(text, vocab_size)
    return tokenizer, tokenizer.encode(text)

  @classmethod
  def load(cls, path: str) -> BPETokenizer:
    """A tokenizer saved by `save` (a tokenizer.json over this class's base pieces)."""
    with open(path) as f:
      try:
        saved = json.load(f)
      except json.JSONDecodeError:
        saved = {}
    if isinstance(saved, dict) and saved.get("alphabet") == CharTokenizer.alphabet:
      raise ValueError(OLD_FORMAT.format(path=path))
    model = saved.get("model") if isinstance(saved, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    expected = json.loads(cls([]).hf.to_str())["pre_tokenizer"]
    not_ours = ValueError(f"{path} is not a BPE tokenizer file over {cls.alphabet_name}")
    if (not isinstance(vocab, dict) or model.get("type") != "BPE" or "merges" not in model
        or saved.get("pre_tokenizer") != expected
        or [vocab.get(c) for c in cls.base] != list(range(len(cls.base)))):
      raise not_ours
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    tokenizer = cls._from_string_merges(merges)
    if tokenizer.pieces != sorted(vocab, key=vocab.get):
      raise not_ours
    return tokenizer

  def save(self, path: str) -> None:
    """Writes tokenizer.json (atomically: a reader never sees half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    self.hf.save(tmp)
    os.replace(tmp, path)

  _word_index = staticmethod(_text8_word_index)

  def encode(self, text: str) -> np.ndarray:
    """Encodes text to int32[N]: text8-alphabet text only (any other character is a ValueError),
    or for the byte-level BPE any text.

    `tokenizers` encodes each distinct word once; the text's ids are gathered from those.
    """
    words, occurrences = self._word_index(text)
    encoded = self.hf.encode_batch_fast(words, add_special_tokens=False)
    lengths = np.array([len(e.ids) for e in encoded], np.int64)
    flat = np.array([i for e in encoded for i in e.ids], np.int32)
    n, starts = lengths[occurrences], (np.cumsum(lengths) - lengths)[occurrences]
    return flat[np.repeat(starts - (np.cumsum(n) - n), n) + np.arange(n.sum())]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes ids; ids outside the vocabulary (e.g. the mask id) become '_'."""
    return "".join(self.pieces[i] if 0 <= i < self.vocab_size else self.placeholder
                   for i in np.asarray(ids, np.int64).reshape(-1).tolist())


class ByteBPETokenizer(BPETokenizer):
  """Byte-pair merges over the 256 bytes of raw UTF-8 text, through Hugging Face `tokenizers`:
  id b < 256 is byte b, later ids the merged pieces in the order they were first made.

  Text is split as GPT-2 splits it (letters, digits and other runs, each with the space before it)
  and a merge never spans two such pieces; nothing is cleaned, any text is encoded, and
  token_lengths count bytes (bits per byte). `save` writes a standard byte-level tokenizer.json.
  """

  base = byte_symbols()
  base_name = "the 256 bytes"
  alphabet_name = "bytes"
  unit = "byte"
  placeholder = "[MASK]"

  def __init__(self, merges: Sequence[tuple[int, int]]):
    super().__init__(merges)
    byte_of = {c: b for b, c in enumerate(self.base)}
    self.piece_bytes = [bytes(byte_of[c] for c in p) for p in self.pieces]

  @staticmethod
  def _hf(model: hf_tokenizers.models.Model) -> hf_tokenizers.Tokenizer:
    """A Hugging Face byte-level tokenizer of `model` (GPT-2's pre-tokenisation)."""
    tokenizer = hf_tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                     use_regex=True)
    tokenizer.decoder = hf_tokenizers.decoders.ByteLevel()
    return tokenizer

  _training_pieces = staticmethod(functools.partial(_byte_pieces, size=_LEARN_PIECE_CHARS))

  @staticmethod
  def _word_index(text: str) -> tuple[list[str], np.ndarray]:
    """The distinct pieces of any text under GPT-2's pre-tokenisation pattern and, for each of
    the text's pieces, its number among them."""
    index: dict = {}
    occurrences = [np.zeros(0, np.int64)]
    for piece in _byte_pieces(text):
      words = _GPT2_WORDS.findall(piece)
      for w in dict.fromkeys(words):
        index.setdefault(w, len(index))
      occurrences.append(np.fromiter(map(index.__getitem__, words), np.int64, len(words)))
    return list(index), np.concatenate(occurrences)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes ids; ids outside the vocabulary (e.g. the mask id) become '[MASK]', and bytes that
    do not form UTF-8 (a cut character) the replacement character."""
    out, run = [], []
    for i in np.asarray(ids, np.int64).reshape(-1).tolist():
      if 0 <= i < self.vocab_size:
        run.append(self.piece_bytes[i])
        continue
      out += [b"".join(run).decode("utf-8", "replace"), self.placeholder]
      run = []
    return "".join([*out, b"".join(run).decode("utf-8", "replace")])


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


TOKENIZERS = {"char": CharTokenizer, "bpe": BPETokenizer.load, "byte_bpe": ByteBPETokenizer.load,
              "gpt2": GPT2Tokenizer}
LEARNED = {"bpe": BPETokenizer, "byte_bpe": ByteBPETokenizer}  # learned from a run's own text
Tokenizer = CharTokenizer | BPETokenizer | ByteBPETokenizer | GPT2Tokenizer


def get_tokenizer(name: str, **kw) -> Tokenizer:
  """The tokenizer registered under `name`: "char", "gpt2" (ranks_path=...), or "bpe" or
  "byte_bpe" (a file saved by `save`, as path=...)."""
  if name not in TOKENIZERS:
    raise ValueError(f"Unknown tokenizer {name!r}; known: {sorted(TOKENIZERS)}")
  return TOKENIZERS[name](**kw)
