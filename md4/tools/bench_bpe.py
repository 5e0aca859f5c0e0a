"""Benchmark of BPE learning and encoding: this tree's tokenizer against an earlier revision's.

  python -m md4.tools.bench_bpe --chars 5e6 2e7 9e7 --before_max 2e7

The text is a text8 file (--text) or, by default, the cleaned Shakespeare corpus repeated to the
length asked for. Each size is timed for learning `--vocab` ids and then encoding the same text,
by the tokenizer of `--before` (a git revision, read with `git show`; sizes above --before_max are
skipped for it) and by this tree's. Wall and CPU seconds are both printed: the CPU count is the
fairer one on a shared machine. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import subprocess
import sys
import tempfile
import time

from md4.data import corpora, tokenizers

REPO = pathlib.Path(__file__).resolve().parents[2]
BEFORE = "9426dc9"  # the last revision with the numpy BPETokenizer


def load_revision(revision: str):
  """md4/data/tokenizers.py as it was at `revision`, imported as a module of its own."""
  source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:md4/data/tokenizers.py"],
                          check=True, capture_output=True, text=True).stdout
  path = pathlib.Path(tempfile.mkdtemp()) / "tokenizers_before.py"
  path.write_text(source)
  spec = importlib.util.spec_from_file_location("tokenizers_before", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def timed(fn, *args) -> tuple[object, float, float]:
  """fn(*args), its wall seconds and its CPU seconds (all threads)."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn(*args)
  return out, time.perf_counter() - wall, time.process_time() - cpu


def bench(bpe, text: str, vocab: int) -> dict:
  """Seconds to learn `vocab` ids from `text` and to encode it."""
  tokenizer, learn_wall, learn_cpu = timed(bpe.learn, text, vocab)
  ids, encode_wall, encode_cpu = timed(tokenizer.encode, text)
  return {"learn_s": round(learn_wall, 2), "encode_s": round(encode_wall, 2),
          "learn_cpu_s": round(learn_cpu, 2), "encode_cpu_s": round(encode_cpu, 2),
          "chars_per_token": round(len(text) / len(ids), 4)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--chars", type=float, nargs="+", default=[5e6, 2e7, 9e7])
  parser.add_argument("--before_max", type=float, default=2e7)
  parser.add_argument("--before", default=BEFORE, help="git revision of the 'before' tokenizer")
  parser.add_argument("--vocab", type=int, default=512)
  parser.add_argument("--text", help="a text8 file (default: Shakespeare, repeated)")
  args = parser.parse_args()
  if args.text:
    source = open(args.text).read()
  else:
    source = corpora.clean_text8(corpora.read_text_files(REPO / "data" / "shakespeare"))
  sizes = [int(n) for n in args.chars]
  source = " ".join([source] * (max(sizes) // len(source) + 1))
  before = load_revision(args.before).BPETokenizer
  results = []
  for size in sizes:
    text = source[:size].strip()
    row = {"chars": size, "after": bench(tokenizers.BPETokenizer, text, args.vocab)}
    if size <= args.before_max:
      row["before"] = bench(before, text, args.vocab)
      total = lambda r, k: r[f"learn{k}_s"] + r[f"encode{k}_s"]
      row["speedup_wall"] = round(total(row["before"], "") / total(row["after"], ""), 1)
      row["speedup_cpu"] = round(total(row["before"], "_cpu") / total(row["after"], "_cpu"), 1)
    print(json.dumps(row), file=sys.stderr)
    results.append(row)
  print(json.dumps({"vocab": args.vocab, "before": args.before, "results": results}))


if __name__ == "__main__":
  main()
