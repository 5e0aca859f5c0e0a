"""Byte-level BPE (data.tokenizer=byte_bpe) against a textbook BPE over UTF-8 bytes, Hugging
Face's own encoding of the same file, and through the data pipeline."""

import json

import ml_collections
import numpy as np
import pytest
import regex
import tokenizers as hf

from md4.data import pipeline, tokenizers
from tests.bpe_oracle import textbook_merge

# GPT-2's pre-tokenisation, written out here as its paper's code states it (not imported).
WORDS = regex.compile(
  r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
TRICKY = ("Caf\u00e9 na\u00efve \u2014 \u00fcber 12,345.6 \u0663\u0664 \U0001d4b3"
          " \U0001f642\U0001f642 it's THEY'LL 'tis a\u00a0b\u2009c\u3000d\x0be\x1cf\x85g"
          "  h\t\ti\n\n j\r\n end  ")


def textbook_bpe(text: str, merges: list[tuple[bytes, bytes]]) -> tuple[list, list]:
  """Textbook BPE on lists of byte strings: the text's GPT-2 words, each a list of its bytes,
  merged by `merges` in order, each left to right. Returns, per merge, (its pair's count, the
  largest pair count) before it is applied, and the ids (bytes 0..255, then new pieces as they
  first appear)."""
  words = [[bytes([b]) for b in w.encode("utf-8")] for w in WORDS.findall(text)]
  counts = textbook_merge(words, merges)
  ids = {bytes([i]): i for i in range(256)}
  for a, b in merges:
    ids.setdefault(a + b, len(ids))
  return counts, [ids[piece] for w in words for piece in w]


@pytest.fixture(scope="module")
def learned():
  rng = np.random.default_rng(0)
  words = ["the", "The", "caf\u00e9", "na\u00efve", "\U0001f642", "don't", "42", "--", "\u00fcber"]
  text = " ".join(rng.choice(words, 400)) + " aaaaaaa\n\n  indented\tlines.\n"
  return text, tokenizers.ByteBPETokenizer.learn(text, 290)


def test_byte_symbols_are_hugging_faces_byte_level_alphabet():
  symbols = tokenizers.byte_symbols()
  assert len(set(symbols)) == 256 and set(symbols) == set(hf.pre_tokenizers.ByteLevel.alphabet())
  level = hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  text = "".join(map(chr, range(128))) + "\u00e9\u20ac\U0001f642\u00ff\u0100"
  (written, _), = level.pre_tokenize_str(text)
  assert written == "".join(symbols[b] for b in text.encode("utf-8"))


def test_merges_are_most_frequent_pairs_and_encode_like_textbook_bpe(learned):
  text, tok = learned
  assert tok.vocab_size == 290 and len(set(tok.pieces)) == 290
  merges = [(tok.piece_bytes[a], tok.piece_bytes[b]) for a, b in tok.merges]
  counts, ids = textbook_bpe(text, merges)
  assert all(count == best >= 2 for count, best in counts)  # each merge a most frequent pair
  assert tok.encode(text).tolist() == ids
  assert tokenizers.ByteBPETokenizer.learn_encoding(text, 290)[1].tolist() == ids
  assert (b"a", b"a") in merges  # the left-to-right rule for "aaa" was exercised
  for other in (TRICKY, "The caf\u00e9's 42 \U0001f642s"):  # text not learned from
    ids = tok.encode(other)
    assert ids.tolist() == textbook_bpe(other, merges)[1] == tok.hf.encode(other).ids
    assert tok.decode(ids) == other
  assert tok.token_lengths.tolist() == [len(p) for p in tok.piece_bytes]
  assert tok.unit == "byte" and tok.token_lengths[:256].tolist() == [1] * 256


def test_pieces_are_cut_where_gpt2_would_split(learned):
  _, tok = learned
  text = (TRICKY + "a   b    c \t d  \n e") * 4
  level = hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  starts = {start for _, (start, _) in level.pre_tokenize_str(text)}  # where GPT-2 splits
  for size in range(1, 12):  # cut near every kind of space run
    pieces = list(tokenizers._byte_pieces(text, size))
    assert "".join(pieces) == text and len(pieces) > 10
    cuts = np.cumsum([len(p) for p in pieces])[:-1]
    assert set(cuts.tolist()) <= starts
    assert [i for p in pieces for i in tok.hf.encode(p).ids] == tok.hf.encode(text).ids


def test_decode_placeholders_and_broken_characters(learned):
  _, tok = learned
  assert tok.decode([72, 290, 105]) == "H[MASK]i"  # the mask id
  assert tok.decode([0xC3]) == "\ufffd"  # half a two-byte character
  assert tok.decode([0xC3, 0xA9]) == "\u00e9"


def test_save_load_and_the_wrong_files(learned, tmp_path):
  text, tok = learned
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  loaded = tokenizers.get_tokenizer("byte_bpe", path=path)
  assert loaded.merges == tok.merges
  assert loaded.encode(TRICKY).tolist() == tok.encode(TRICKY).tolist()
  standard = hf.Tokenizer.from_file(path)  # a standard tokenizer.json
  assert standard.encode(TRICKY).ids == tok.encode(TRICKY).tolist()
  assert standard.decode(standard.encode(TRICKY).ids) == TRICKY
  with pytest.raises(ValueError, match="is not a BPE tokenizer file over the text8 alphabet"):
    tokenizers.BPETokenizer.load(path)
  chars = tmp_path / "chars.json"
  tokenizers.BPETokenizer.learn("the cat the hat the bat " * 20, 30).save(str(chars))
  with pytest.raises(ValueError, match="is not a BPE tokenizer file over bytes"):
    tokenizers.ByteBPETokenizer.load(str(chars))
  saved = json.loads(open(path).read())
  saved["pre_tokenizer"]["use_regex"] = False  # another pre-tokenisation: other encodings
  (tmp_path / "other.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match="over bytes"):
    tokenizers.ByteBPETokenizer.load(str(tmp_path / "other.json"))
  with pytest.raises(ValueError, match="must be larger than the 256 bytes"):
    tokenizers.ByteBPETokenizer.learn(text, 256)


def test_pipeline_reads_raw_text_and_counts_bytes(corpus, tmp_path):
  raw = open(corpus).read()
  cut = int(round(len(raw) * 0.9))
  file = str(tmp_path / "run" / "tokenizer.json")
  cfg = ml_collections.ConfigDict({"dataset": "text_files", "tokenizer": "byte_bpe",
                                   "path": corpus})
  ds = pipeline.create_datasets(cfg, seq_len=16, batch_size=8, seed=0, vocab_size=400,
                                tokenizer_file=file)
  tok = ds.tokenizer
  assert tok.merges == tokenizers.ByteBPETokenizer.learn(raw[:cut], 400).merges
  assert tokenizers.ByteBPETokenizer.load(file).merges == tok.merges
  train_ids = tok.encode(raw[:cut])
  assert ds.info["train_units_per_token"] == pytest.approx(
      len(raw[:cut].encode("utf-8")) / len(train_ids))
  held_out = tok.decode(np.concatenate([b["tokens"] for b in ds.eval_batches()]).reshape(-1))
  assert raw[cut:].startswith(held_out) and any(c.isupper() for c in held_out)  # not cleaned
  with pytest.raises(ValueError, match="data.tokenizer=byte_bpe is for text8, text_files and tfds"):
    pipeline.create_datasets(ml_collections.ConfigDict(
        {"dataset": "owt", "tokenizer": "byte_bpe", "path": str(tmp_path)}),
        seq_len=16, batch_size=8, seed=0)
