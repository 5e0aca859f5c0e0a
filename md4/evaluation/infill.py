"""Infilling inputs: which tokens (or pixels) are known, from a text template or an image region.

Pure numpy; the samplers take the result as `known` / `known_mask` and never change known
positions.

Text: `text_template("to be or ___ to be", tokenizer, seq_len)`. Each gap character marks one
unknown token; the known pieces between gaps are encoded separately, so with GPT-2 BPE a gap of
three characters is three unknown *tokens* (not characters), and a known piece is tokenized on
its own (its first token may differ from the one the same text gets inside a longer string).
With the character tokenizer one character is one token. Positions after the template are
unknown, so a template without gaps is a prompt.

A prompt (`prompt(text, tokenizer, seq_len)`) is known text at the start, cut to seq_len tokens.

Images: `image_region((H, W, C), "center")`, where the region names what is *unknown*.
"""

from __future__ import annotations

import re

import numpy as np

NAMED_REGIONS = ("top", "bottom", "left", "right", "center")


def text_template(template: str, tokenizer, seq_len: int, gap: str = "_"
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(known int32[seq_len], known_mask bool[seq_len]) from a template with `gap` characters."""
  if len(gap) != 1:
    raise ValueError(f"the gap marker must be one character, got {gap!r}")
  ids, known = [], []
  for piece in re.split(f"({re.escape(gap)}+)", template):
    if piece.startswith(gap):
      ids += [0] * len(piece)
      known += [False] * len(piece)
    elif piece:
      encoded = np.asarray(tokenizer.encode(piece)).tolist()
      ids += encoded
      known += [True] * len(encoded)
  if len(ids) > seq_len:
    raise ValueError(f"the infill template is {len(ids)} tokens long, more than seq_len {seq_len}")
  tokens, known_mask = _padded(ids, known, seq_len)
  if known_mask.all():
    raise ValueError(f"the infill template fills all {seq_len} tokens; mark unknown ones with "
                     f"{gap!r}")
  return tokens, known_mask


def prompt(text: str, tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(known, known_mask) for samples that start with `text` (cut to seq_len tokens)."""
  ids = np.asarray(tokenizer.encode(text)).tolist()[:seq_len]
  return _padded(ids, [True] * len(ids), seq_len)


def _padded(ids: list[int], known: list[bool], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """ids and their known flags as int32[seq_len], bool[seq_len]; later positions unknown."""
  tokens = np.zeros(seq_len, np.int32)
  tokens[:len(ids)] = ids
  known_mask = np.zeros(seq_len, bool)
  known_mask[:len(known)] = known
  return tokens, known_mask


def image_region(image_shape: tuple[int, int, int], region: str) -> np.ndarray:
  """known_mask bool[H, W, C]: False inside `region`, the part to be filled.

  `region` is one of top, bottom, left, right (a half of the image), center (the middle half in
  each direction), or "y0:y1,x0:x1" in pixels (Python slices: empty bounds reach the edge).
  """
  height, width, channels = image_shape
  halves = {"top": (slice(0, height // 2), slice(None)),
            "bottom": (slice(height // 2, None), slice(None)),
            "left": (slice(None), slice(0, width // 2)),
            "right": (slice(None), slice(width // 2, None)),
            "center": (slice(height // 4, height - height // 4),
                       slice(width // 4, width - width // 4))}
  if region in halves:
    rows, cols = halves[region]
  else:
    match = re.fullmatch(r"\s*(\d*):(\d*)\s*,\s*(\d*):(\d*)\s*", region)
    if not match:
      raise ValueError(f"unknown infill region {region!r}; use {', '.join(NAMED_REGIONS)} or "
                       f"'y0:y1,x0:x1'")
    y0, y1, x0, x1 = (int(v) if v else None for v in match.groups())
    if any(v is not None and v > limit for v, limit in
           ((y0, height), (y1, height), (x0, width), (x1, width))):
      raise ValueError(f"infill region {region!r} lies outside the {height}x{width} image")
    rows, cols = slice(y0, y1), slice(x0, x1)
  known_mask = np.ones(image_shape, bool)
  known_mask[rows, cols] = False
  if known_mask.all():
    raise ValueError(f"infill region {region!r} is empty")
  return known_mask


def side_by_side(known: np.ndarray, known_mask: np.ndarray, completions: np.ndarray,
                 fill: int) -> np.ndarray:
  """int[B, H, 2W + 1, C]: each masked input (unknown pixels set to `fill`) beside its completion.

  A one-pixel column of `fill` separates the two.
  """
  masked = np.where(known_mask, known, fill)
  separator = np.full((*completions.shape[:2], 1, completions.shape[3]), fill)
  return np.concatenate([np.broadcast_to(masked, completions.shape), separator, completions],
                        axis=2)
