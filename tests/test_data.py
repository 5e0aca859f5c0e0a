"""Tests for md4.data: tokenizers, corpora, OWT shards and the grain pipelines."""

import json
import pathlib
import time
import zipfile

import ml_collections
import numpy as np
import pytest
import tqdm

from md4.data import corpora, owt, pipeline, prepare, tokenizers
from tests.bpe_oracle import textbook_merge

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "shakespeare"
needs_gpt2 = pytest.mark.skipif(
  not tokenizers.DEFAULT_GPT2_RANKS.is_file(),
  reason="data/gpt2.tiktoken absent: run `python -m md4.data.prepare gpt2 --out data`",
)


def _random_text(seed: int, num_words: int) -> str:
  """Random lowercase words: every 32-character window is unique with overwhelming probability."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  return " ".join("".join(rng.choice(letters, rng.integers(1, 9))) for _ in range(num_words))


@pytest.fixture()
def corpus(tmp_path):
  """Two small text files (with capitals and punctuation to be cleaned) and their cleaned text."""
  d = tmp_path / "corpus"
  d.mkdir()
  a, b = _random_text(0, 3000), _random_text(1, 3000)
  (d / "b.txt").write_text(b.upper() + "!")
  (d / "a.txt").write_text(a.title() + ",")
  return d, corpora.clean_text8(a + "\n" + b)


def _cfg(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"dataset": "text_files", "tokenizer": "char", **kw})


def _take(it, n):
  return [next(it)["tokens"] for _ in range(n)]


def test_char_tokenizer():
  tok = tokenizers.get_tokenizer("char")
  ids = tok.encode("hello zebra")
  assert ids.dtype == np.int32 and tok.vocab_size == 27
  np.testing.assert_array_equal(ids, [7, 4, 11, 11, 14, 26, 25, 4, 1, 17, 0])
  assert tok.decode(ids) == "hello zebra"
  assert tok.decode([0, 27, 26, 25, -1]) == "a_ z_"  # out-of-vocabulary (mask) ids -> '_'
  with pytest.raises(ValueError, match="only a-z and space"):
    tok.encode("Hello")


@needs_gpt2
def test_gpt2_tokenizer():
  tok = tokenizers.get_tokenizer("gpt2")
  assert tok.encode("Hello world").tolist() == [15496, 995]
  assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
  text = "It's 2024: naïve café, ünïcödé & emoji 🙂\n\n  spaces."
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode([15496, 50257, 995]) == "Hello[MASK] world"
  assert tok.decode([50256]) == "<|endoftext|>"


def test_get_tokenizer_unknown():
  with pytest.raises(ValueError,
                     match=r"Unknown tokenizer 'wordpiece'; known: \['bpe', 'byte_bpe', 'char', "):
    tokenizers.get_tokenizer("wordpiece")


def _reference_bpe(text: str, merges: list[tuple[str, str]]) -> tuple[list, list]:
  """Textbook BPE on lists: the text's words (a new word at every space) merged by `merges` in
  order, each left to right. Returns, per merge, (its pair's count, the largest pair count) before
  it is applied, and the final ids (the 27 characters, then new pieces as they first appear)."""
  words = []
  for c in text:
    if c == " " or not words:
      words.append([])
    words[-1].append(c)
  counts = textbook_merge(words, merges)
  ids = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}
  for a, b in merges:
    ids.setdefault(a + b, len(ids))
  return counts, [ids[piece] for w in words for piece in w]


def test_bpe_learns_valid_merges_and_encodes_like_textbook_bpe(tmp_path):
  text = _random_text(3, 400) + " aaaaaaa eee the the the"  # runs of one letter overlap
  tok = tokenizers.BPETokenizer.learn(text, 90)
  assert tok.vocab_size == 90 and len(tok.pieces) == len(set(tok.pieces)) == 90
  merges = [(tok.pieces[a], tok.pieces[b]) for a, b in tok.merges]
  counts, seq = _reference_bpe(text, merges)
  assert all(count == best >= 2 for count, best in counts)  # each merge a most frequent pair
  assert tok.encode(text).tolist() == seq
  learned, ids = tokenizers.BPETokenizer.learn_encoding(text, 90)
  assert learned.merges == tok.merges and ids.tolist() == seq
  # Text the merges were not learned from, with words around the 13 characters of a word code.
  other = ("antidisestablishmentarianism " + _random_text(4, 200) + "  two  spaces abcdefghijkl"
           " abcdefghijklm abcdefghijklmn antidisestablishmentarianism abcdefghijklm ")
  ids = tok.encode(other)
  assert tok.decode(ids) == other and len(ids) < len(other)
  assert ids.tolist() == _reference_bpe(other, merges)[1]
  assert tok.token_lengths.tolist() == [len(tok.decode([i])) for i in range(90)]
  assert ("a", "a") in merges  # the left-to-right rule for "aaa" was exercised
  assert tok.decode([5, 90, 6]) == "f_g"  # the mask id is a placeholder
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  loaded = tokenizers.get_tokenizer("bpe", path=path)
  assert loaded.merges == tok.merges and loaded.encode(other).tolist() == ids.tolist()
  hf = __import__("tokenizers").Tokenizer.from_file(path)  # a standard tokenizer.json
  assert hf.encode(other).ids == ids.tolist() and hf.decode(ids.tolist()) == other
  for content in ('{"merges": []}', "{not json", "[1, 2]", hf.to_str().replace('"a":0', '"a":1')):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ValueError, match="not a BPE tokenizer file over the text8 alphabet"):
      tokenizers.BPETokenizer.load(str(tmp_path / "bad.json"))
  old = {"alphabet": "abcdefghijklmnopqrstuvwxyz ", "merges": [[19, 7]]}  # the numpy BPE's file
  (tmp_path / "old.json").write_text(json.dumps(old))
  with pytest.raises(ValueError, match="holds merges by id, the format of md4's numpy BPE"):
    tokenizers.BPETokenizer.load(str(tmp_path / "old.json"))
  with pytest.raises(ValueError, match="must be larger than the 27 characters"):
    tokenizers.BPETokenizer.learn(text, 27)
  with pytest.raises(ValueError, match="too few repeated pairs for a 40-token BPE vocabulary"):
    tokenizers.BPETokenizer.learn("abcdefg", 40)
  with pytest.raises(ValueError, match="CharTokenizer accepts only a-z and space"):
    tok.encode("Capital")
  with pytest.raises(ValueError, match="CharTokenizer accepts only a-z and space"):
    tokenizers.BPETokenizer.learn("Capital letters", 30)


def test_bpe_pipeline_learns_on_the_training_split_only(corpus, tmp_path):
  path, text = corpus
  file = str(tmp_path / "run" / "tokenizer.json")
  cfg = _cfg(path=str(path), tokenizer="bpe")
  ds = pipeline.create_datasets(cfg, seq_len=16, batch_size=8, seed=0, vocab_size=60,
                                tokenizer_file=file)
  cut = int(round(len(text) * 0.9))
  assert ds.tokenizer.merges == tokenizers.BPETokenizer.learn(text[:cut], 60).merges
  assert ds.vocab_size == 60 and tokenizers.BPETokenizer.load(file).merges == ds.tokenizer.merges
  train_tokens = ds.tokenizer.encode(text[:cut])
  assert ds.info["train_units_per_token"] == pytest.approx(cut / len(train_tokens))
  chunks = pipeline.TokenChunks(train_tokens, 16)
  rows = np.concatenate(_take(ds.train, len(chunks) // 8))
  train_rows = {bytes(r.astype(np.uint8)) for r in rows}
  assert train_rows <= {bytes(chunks[i].astype(np.uint8)) for i in range(len(chunks))}
  eval_rows = np.concatenate([b["tokens"] for b in ds.eval_batches()])
  held_out = ds.tokenizer.decode(eval_rows.reshape(-1))
  assert text[cut:].startswith(held_out) and len(held_out) > 16 * len(eval_rows)
  assert all(ds.tokenizer.decode(r) not in text[:cut] for r in eval_rows)
  # The saved file is what later runs read, whatever text they are given (zero-shot eval).
  other = pipeline.create_datasets(_cfg(path=str(path / "a.txt"), tokenizer="bpe"), seq_len=16,
                                   batch_size=8, seed=0, vocab_size=60, tokenizer_file=file)
  assert other.tokenizer.merges == ds.tokenizer.merges
  with pytest.raises(ValueError, match="data.tokenizer=bpe is for text8, text_files and tfds"):
    pipeline.create_datasets(_cfg(dataset="owt", path=str(tmp_path), tokenizer="bpe"),
                             seq_len=16, batch_size=8, seed=0)


def test_clean_text8():
  assert corpora.clean_text8("Hello, World!") == "hello world"
  assert corpora.clean_text8("  It's 42 o'clock\n\tNOW.  ") == "it s four two o clock now"
  assert corpora.clean_text8("café—naïve") == "caf na ve"
  assert corpora.clean_text8("...") == ""


def test_load_text8_split(tmp_path):
  text = "a" * 90_000_000 + "b" * 5_000_000 + "c" * 5_000_000
  with zipfile.ZipFile(tmp_path / "text8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
    zf.writestr("text8", text)
  splits = corpora.load_text8(tmp_path)  # finds text8.zip in the directory
  assert {k: (len(v), set(v)) for k, v in splits.items()} == {
    "train": (90_000_000, {"a"}), "valid": (5_000_000, {"b"}), "test": (5_000_000, {"c"})}
  with pytest.raises(FileNotFoundError, match="text8 not found"):
    corpora.load_text8(tmp_path / "nope.zip")


def test_text8_download_shows_progress_and_writes_the_zip(tmp_path, monkeypatch, capsys):
  """The real download code, from a local URL (no internet here): the bar reaches the size."""
  source = tmp_path / "served.zip"
  with zipfile.ZipFile(source, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("text8", "a" * 300_000)
  monkeypatch.setattr(corpora, "TEXT8_URL", source.as_uri())
  class Shown(tqdm.tqdm):  # stderr is not a terminal here, where disable=None hides the bar
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **{**kwargs, "disable": False, "mininterval": 0})

  monkeypatch.setattr(tqdm, "tqdm", Shown)
  out = corpora.download_text8(tmp_path / "data")
  assert out == tmp_path / "data" / "text8.zip" and out.read_bytes() == source.read_bytes()
  assert not out.with_suffix(".zip.part").exists()
  bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
  assert bar.startswith("text8.zip: 100%") and "300k/300k" in bar, bar


def test_read_text_files(tmp_path):
  (tmp_path / "b.txt").write_text("second")
  (tmp_path / "a.txt").write_text("first")
  (tmp_path / "c.md").write_text("ignored")
  assert corpora.read_text_files(tmp_path) == "first\nsecond"
  assert corpora.read_text_files(str(tmp_path / "*.md")) == "ignored"
  with pytest.raises(FileNotFoundError, match="No text files match"):
    corpora.read_text_files(tmp_path / "missing" / "*.txt")


def test_determinism_and_epochs(corpus):
  path, text = corpus
  make = lambda seed: pipeline.create_datasets(_cfg(path=str(path)), seq_len=32, batch_size=8,
                                               seed=seed)
  a, b, c = make(0), make(0), make(1)
  batches_a = _take(a.train, 10)
  assert all(x.shape == (8, 32) and x.dtype == np.int32 for x in batches_a)
  np.testing.assert_array_equal(batches_a, _take(b.train, 10))
  assert not np.array_equal(batches_a, _take(c.train, 10))
  # Two epochs: each is a permutation of all training chunks, and the two orders differ.
  n = a.info["train_sequences"]
  chunks = pipeline.TokenChunks(a.tokenizer.encode(text[:int(round(len(text) * 0.9))]), 32)
  assert n == len(chunks)
  rows = np.concatenate(batches_a + _take(a.train, 2 * n // 8))[:2 * n]
  all_chunks = np.stack([chunks[i] for i in range(n)])
  key = lambda x: sorted(map(bytes, x.astype(np.uint8)))
  assert key(rows[:n]) == key(all_chunks) and key(rows[n:]) == key(all_chunks)
  assert not np.array_equal(rows[:n], rows[n:])


def test_checkpoint_resume(corpus):
  path, _ = corpus
  make = lambda: pipeline.create_datasets(_cfg(path=str(path)), seq_len=32, batch_size=4, seed=3)
  first = make()
  _take(first.train, 7)
  state = json.loads(json.dumps(first.train.get_state()))  # must survive JSON
  expected = _take(first.train, 30)  # crosses an epoch boundary (21 chunks / 4 per batch)
  resumed = make()
  resumed.train.set_state(state)
  np.testing.assert_array_equal(_take(resumed.train, 30), expected)


def test_holdout_disjoint_and_eval_repeatable(corpus):
  path, text = corpus
  ds = pipeline.create_datasets(_cfg(path=str(path), holdout_fraction=0.2), seq_len=16,
                                batch_size=8, seed=0, eval_batch_size=5)
  tok = ds.tokenizer
  cut = int(round(len(text) * 0.8))
  n_eval = (len(text) - cut) // 16
  assert ds.info["eval_sequences"] == n_eval and ds.info["eval_batches"] == n_eval // 5
  eval_rows = np.concatenate([b["tokens"] for b in ds.eval_batches()])
  assert eval_rows.shape == (n_eval // 5 * 5, 16)  # ragged last batch dropped
  # Held-out rows are exactly the consecutive chunks of the last 20% of the characters.
  assert tok.decode(eval_rows.reshape(-1)) == text[cut:cut + eval_rows.size]
  again = [b["tokens"] for b in ds.eval_batches()]
  np.testing.assert_array_equal(np.concatenate(again), eval_rows)
  # A full epoch of training rows covers only characters [0, cut): no held-out chunk is in it.
  train_rows = np.concatenate(_take(ds.train, ds.info["train_sequences"] // 8 + 1))
  train_text = text[:cut]
  assert all(tok.decode(r) in train_text for r in train_rows[:50])
  assert not {bytes(r.astype(np.uint8)) for r in train_rows} & {
    bytes(r.astype(np.uint8)) for r in eval_rows}
  assert all(tok.decode(r) not in train_text for r in eval_rows)


def test_process_shards_cover_global_batch(corpus):
  path, _ = corpus
  make = lambda i, n: pipeline.create_datasets(
    _cfg(path=str(path)), seq_len=16, batch_size=8, seed=5, process_index=i, process_count=n,
    eval_batch_size=6)
  single, p0, p1 = make(0, 1), make(0, 2), make(1, 2)
  for _ in range(12):
    g, a, b = next(single.train)["tokens"], next(p0.train)["tokens"], next(p1.train)["tokens"]
    assert a.shape == b.shape == (4, 16)
    np.testing.assert_array_equal(np.concatenate([a, b]), g)
    assert not {bytes(r.astype(np.uint8)) for r in a} & {bytes(r.astype(np.uint8)) for r in b}
  ev = [list(d.eval_batches()) for d in (single, p0, p1)]
  assert len(ev[0]) == len(ev[1]) == len(ev[2]) == single.info["eval_batches"]
  for g, a, b in zip(*ev, strict=True):
    np.testing.assert_array_equal(np.concatenate([a["tokens"], b["tokens"]]), g["tokens"])


def test_config_errors(corpus, tmp_path):
  path, _ = corpus
  kw = dict(seq_len=16, batch_size=8, seed=0)
  with pytest.raises(ValueError, match=r"Unknown dataset 'imagenet'; known: \['text8', "):
    pipeline.create_datasets(_cfg(dataset="imagenet"), **kw)
  with pytest.raises(FileNotFoundError, match="No text files match"):
    pipeline.create_datasets(_cfg(path=str(tmp_path / "nothing")), **kw)
  with pytest.raises(FileNotFoundError, match="text8 not found"):
    pipeline.create_datasets(_cfg(dataset="text8", path=str(tmp_path / "text8.zip")), **kw)
  with pytest.raises(ValueError, match="seq_len 100000 is longer than the training data"):
    pipeline.create_datasets(_cfg(path=str(path)), seq_len=100_000, batch_size=8, seed=0)
  with pytest.raises(ValueError, match="batch_size 8 is not a positive multiple of process_c"):
    pipeline.create_datasets(_cfg(path=str(path)), seq_len=16, batch_size=8, seed=0,
                             process_count=3)
  with pytest.raises(ValueError, match="fewer than one eval batch of 4096"):
    pipeline.create_datasets(_cfg(path=str(path)), eval_batch_size=4096, **kw)
  with pytest.raises(FileNotFoundError, match="not a prepared OWT directory"):
    pipeline.create_datasets(_cfg(dataset="owt", path=str(tmp_path)), **kw)


DOCS = [f"Document {i}: the quick brown fox number {i} jumps over {i * 7} lazy dogs.\n"
        + "More text here. " * (i % 3) for i in range(12)]


@needs_gpt2
def test_owt_shards(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  with (src / "docs.jsonl").open("w") as f:
    for d in DOCS[:10]:
      f.write(json.dumps({"text": d}) + "\n")
  (src / "zz.txt").write_text(DOCS[10])  # a .txt file is one document
  (src / "zzz.txt").write_text(DOCS[11])
  out = tmp_path / "owt"
  meta = owt.prepare_owt(out, seq_len=16, source=src, holdout_fraction=0.25, shard_size=5)
  tok = tokenizers.GPT2Tokenizer()
  valid_idx = [3, 7, 11]  # floor((i + 1) / 4) > floor(i / 4)
  assert [i for i in range(12) if owt.is_heldout(i, 0.25)] == valid_idx
  for split, idx in (("train", [i for i in range(12) if i not in valid_idx]), ("valid", valid_idx)):
    stream = np.concatenate([np.append(tok.encode(DOCS[i]), tok.eot_id) for i in idx])
    n = len(stream) // 16
    info = meta["splits"][split]
    assert info == {"documents": len(idx), "sequences": n, "tokens": 16 * n,
                    "dropped_tokens": len(stream) - 16 * n, "shards": -(-n // 5)}
    assert sorted(p.name for p in out.glob(f"{split}-*")) == [
      f"{split}-{i:05d}-of-{info['shards']:05d}.array_record" for i in range(info["shards"])]
    source = owt.PackedSequences(out, split)
    got = np.concatenate([source[i] for i in range(len(source))])
    np.testing.assert_array_equal(got, stream[:16 * n])
    text = tok.decode(got)
    full = "".join(DOCS[i] + "<|endoftext|>" for i in idx)
    assert text == full[:len(text)] and text.count("<|endoftext|>") >= len(idx) - 1
  assert (meta["seq_len"], meta["vocab_size"], meta["tokenizer"]) == (16, 50257, "gpt2")
  assert owt.prepare_owt(out, seq_len=16, source=src) == meta  # idempotent

  cfg = ml_collections.ConfigDict({"dataset": "owt", "tokenizer": "gpt2", "path": str(out)})
  ds = pipeline.create_datasets(cfg, seq_len=16, batch_size=4, seed=0, eval_batch_size=2)
  batch = next(ds.train)["tokens"]
  assert batch.shape == (4, 16) and batch.dtype == np.int32 and ds.vocab_size == 50257
  assert len(list(ds.eval_batches())) == meta["splits"]["valid"]["sequences"] // 2
  with pytest.raises(ValueError, match="seq_len mismatch: OWT shards .* hold sequences of 16"):
    pipeline.create_datasets(cfg, seq_len=32, batch_size=4, seed=0)
  cfg.tokenizer = "char"
  with pytest.raises(ValueError, match=r"Vocabulary mismatch: .* gpt2 \(vocab 50257\), the con"):
    pipeline.create_datasets(cfg, seq_len=16, batch_size=4, seed=0)


@pytest.mark.skipif(not SHAKESPEARE.is_dir(), reason="run `python -m md4.data.prepare shakespeare`")
def test_shakespeare_corpus():
  start = time.perf_counter()
  cfg = _cfg(path=str(SHAKESPEARE))
  ds = pipeline.create_datasets(cfg, seq_len=128, batch_size=32, seed=0)
  elapsed = time.perf_counter() - start
  text = corpora.clean_text8(corpora.read_text_files(SHAKESPEARE))
  assert len(text) == 4_749_703 and elapsed < 5.0
  cut = int(round(len(text) * 0.9))
  assert ds.info["train_sequences"] == cut // 128
  assert ds.info["eval_sequences"] == (len(text) - cut) // 128
  first_eval = next(iter(ds.eval_batches()))["tokens"]
  assert ds.tokenizer.decode(first_eval[0]) == text[cut:cut + 128]
  assert ds.tokenizer.decode(next(ds.train)["tokens"][0]) in text[:cut]


def test_tfds_prepared_dataset(tmp_path):
  """A tiny tfds dataset prepared offline (ArrayRecord, no TensorFlow) read via tfds.data_source."""
  tfds = pytest.importorskip("tensorflow_datasets")
  splits = {"train": [_random_text(i, 200) for i in range(3)],
            "validation": [_random_text(10, 200).upper(), "Two words."]}

  class Md4TestTinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # No checksums file to look up (that lookup needs `importlib_resources`).

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {name: self._generate_examples(docs) for name, docs in splits.items()}

    def _generate_examples(self, docs):
      for i, doc in enumerate(docs):
        yield i, {"text": doc}

  Md4TestTinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  cfg = _cfg(dataset="tfds", tfds_name="md4_test_tiny_text", path=str(tmp_path))
  ds = pipeline.create_datasets(cfg, seq_len=16, batch_size=4, seed=0, eval_batch_size=2)
  held_out = " ".join(corpora.clean_text8(t) for t in splits["validation"])
  eval_rows = np.concatenate([b["tokens"] for b in ds.eval_batches()])
  assert ds.info["eval_sequences"] == len(held_out) // 16
  assert ds.tokenizer.decode(eval_rows.reshape(-1)) == held_out[:eval_rows.size]
  train_text = " ".join(corpora.clean_text8(t) for t in splits["train"])
  assert ds.info["train_sequences"] == len(train_text) // 16
  assert all(ds.tokenizer.decode(r) in train_text for r in next(ds.train)["tokens"])


def test_kjv_prose_drops_headings_and_verse_numbers():
  printed = ("\nGenesis 1\n\n  1 In the beginning God created the heaven and the earth.\n"
             "  2 And the earth was without form, and void; and darkness was upon the face of\n"
             "the deep.\n\nSong of Solomon 12\n\n  10 Twelve men, 3 days.\n")
  assert corpora.clean_text8(prepare.kjv_prose(printed)) == (
      "in the beginning god created the heaven and the earth and the earth was without form "
      "and void and darkness was upon the face of the deep twelve men three days")
