"""Textbook byte-pair encoding on Python lists, the oracle of the BPE tokenizers' tests."""

from __future__ import annotations

import collections


def textbook_merge(words: list[list], merges: list[tuple]) -> list[tuple[int, int]]:
  """Applies `merges` in order to `words` (lists of pieces, changed in place), each left to
  right; returns, per merge, (its pair's count, the largest pair count) before it is applied."""
  counts = []
  for a, b in merges:
    pairs = collections.Counter(p for w in words for p in zip(w[:-1], w[1:], strict=True))
    counts.append((pairs[a, b], max(pairs.values())))
    for w in words:
      i = 0
      while i + 1 < len(w):
        if (w[i], w[i + 1]) == (a, b):
          w[i:i + 2] = [a + b]
        i += 1
  return counts
