"""Plain-text corpora: text8 and local text files, with text8-style cleaning."""

from __future__ import annotations

import glob
import os
import pathlib
import re
import urllib.request
import zipfile

import tqdm

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_SPLITS = {"train": (0, 90_000_000), "valid": (90_000_000, 95_000_000),
                "test": (95_000_000, 100_000_000)}

_NOT_LETTER = re.compile(r"[^a-z]+")
_DIGITS = str.maketrans({str(d): f" {w} " for d, w in enumerate(
  "zero one two three four five six seven eight nine".split())})


def clean_text8(text: str) -> str:
  """Cleans text the way text8 was made: lowercase, digits spelled out, every run of other
  characters turned into one space, no leading or trailing space.

  Example: "Hello, World! 42x" -> "hello world four two x".
  """
  return _NOT_LETTER.sub(" ", text.lower().translate(_DIGITS)).strip()


def _text8_file(path: str | os.PathLike) -> pathlib.Path:
  """Resolves `path` (a text8 file, text8.zip, or a directory holding one) to a file."""
  path = pathlib.Path(path)
  if path.is_dir():
    for name in ("text8", "text8.zip"):
      if (path / name).is_file():
        return path / name
    raise FileNotFoundError(f"No 'text8' or 'text8.zip' in directory {path}")
  if not path.is_file():
    raise FileNotFoundError(
      f"text8 not found at {path}; pass the text8 file or text8.zip "
      f"(download with `python -m md4.data.prepare text8 --out DIR`)"
    )
  return path


def load_text8(path: str | os.PathLike) -> dict[str, str]:
  """Loads text8 from a `text8` file or `text8.zip`; returns {"train", "valid", "test"} strings.

  Standard split: first 90M characters train, next 5M valid, last 5M test.
  """
  path = _text8_file(path)
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as zf:
      text = zf.read("text8").decode("ascii")
  else:
    text = path.read_text(encoding="ascii")
  if len(text) != TEXT8_SPLITS["test"][1]:
    raise ValueError(f"{path} holds {len(text)} characters; text8 has exactly 100,000,000")
  return {name: text[a:b] for name, (a, b) in TEXT8_SPLITS.items()}


def download_text8(dest: str | os.PathLike) -> pathlib.Path:
  """Downloads text8.zip into directory `dest` (needs the internet); returns its path."""
  dest = pathlib.Path(dest)
  dest.mkdir(parents=True, exist_ok=True)
  out = dest / "text8.zip"
  if not out.is_file():
    tmp = out.with_suffix(".zip.part")
    with tqdm.tqdm(desc="text8.zip", unit="B", unit_scale=True, disable=None) as bar:

      def progress(blocks: int, block_size: int, total: int) -> None:
        done = blocks * block_size
        if total > 0:  # the server sent a length
          bar.total, done = total, min(done, total)
        bar.update(done - bar.n)

      urllib.request.urlretrieve(TEXT8_URL, tmp, reporthook=progress)
    tmp.rename(out)
  return out


def list_text_files(pattern_or_dir: str | os.PathLike) -> list[pathlib.Path]:
  """Sorted files named by a file path, a directory (its *.txt files) or a glob pattern."""
  path = pathlib.Path(pattern_or_dir)
  if path.is_file():
    return [path]
  pattern = str(path / "*.txt") if path.is_dir() else str(pattern_or_dir)
  files = sorted(pathlib.Path(p) for p in glob.glob(pattern, recursive=True))
  files = [f for f in files if f.is_file()]
  if not files:
    raise FileNotFoundError(
      f"No text files match {str(pattern_or_dir)!r} (looked for {pattern!r}); "
      f"for Shakespeare run `python -m md4.data.prepare shakespeare --out data`"
    )
  return files


def read_text_files(pattern_or_dir: str | os.PathLike) -> str:
  """Reads and concatenates (newline-separated) the sorted files of `list_text_files`."""
  return "\n".join(
    f.read_text(encoding="utf-8", errors="replace") for f in list_text_files(pattern_or_dir)
  )
