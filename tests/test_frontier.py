"""The sampler frontier tool: its verdict on hand-made rows, and a tiny end-to-end run."""

import json
import math
import os

import pytest

from configs import ar_demo, demo
from md4.tools import frontier
from md4.training import train


def row(model, setting, steps, entropy, nats, se=0.01):
  return {"model": model, "setting": setting, "steps": steps, "num_samples": 8,
          "network_calls": steps, "entropy": entropy, "gen_nats_per_token": nats,
          "gen_nats_per_token_se": se, "gen_ppl": math.exp(nats)}


DATA = row("data", "held-out windows", 0, 3.0, 3.5)


def test_verdict_holds_only_for_a_lower_setting_in_the_band_by_two_standard_errors():
  ancestral = [row("md4", "ancestral", 8, 3.05, 4.0), row("md4", "ancestral", 48, 3.0, 3.9)]
  # Lower gen-PPL but outside the band (entropy 2.9 < 0.98 * 3.0): it does not count.
  outside = row("md4", "conf-max_prob-g0", 8, 2.9, 2.0)
  lines = frontier.verdict([DATA, *ancestral, outside])
  assert "No other setting lies in the band" in lines[1] and "3.9" not in lines[0]
  assert "gen-PPL 49.40 (48 steps" in lines[1]  # exp(3.9), the best ancestral in the band
  inside = row("md4", "remdm-loop", 128, 2.95, 3.8)
  assert "the claim holds" in frontier.verdict([DATA, *ancestral, outside, inside])[1]
  close = row("md4", "remdm-loop", 128, 2.95, 3.89)
  assert "not established" in frontier.verdict([DATA, *ancestral, close])[1]
  worse = row("md4", "remdm-loop", 128, 2.95, 3.95)
  assert "refuted" in frontier.verdict([DATA, *ancestral, worse])[1]
  assert "cannot be tested" in frontier.verdict([DATA, outside])[1]


def test_settings_cover_the_issue():
  names = {s.name for s in frontier.settings()}
  assert {"ancestral", "remdm-cap", "remdm-rescale", "remdm-loop", "remdm-conf",
          "blocks16-ancestral"} <= names
  assert {f"conf-{c}-g{g}" for c in ("max_prob", "margin", "neg_entropy") for g in (0, 1)} <= names
  assert all(s.models == ("md4",) for s in frontier.settings() if s.name.startswith("remdm"))


@pytest.mark.slow  # two tiny trainings and a dozen sampler compilations
def test_frontier_end_to_end(tmp_path, corpus):
  def tiny(config, workdir, steps):
    config.data.update(path=corpus, tokenizer="char")
    config.vocab_size, config.seq_len = 27, 32
    config.model.update(width=32, depth=1, num_heads=2, matmul_dtype="")
    config.training.update(batch_size=8, num_steps=steps, log_every=steps, eval_every=steps,
                           checkpoint_every=steps)
    config.eval.update(batch_size=8, num_batches=1, weights=("ema",))
    config.sampling.update(every=0)
    train.train(config, workdir)

  ar_dir, md4_dir = str(tmp_path / "ar"), str(tmp_path / "md4")
  tiny(ar_demo.get_config(), ar_dir, 20)
  tiny(demo.get_config(), md4_dir, 10)
  table, png = str(tmp_path / "frontier.md"), str(tmp_path / "frontier.png")
  args = ["--md4", md4_dir, "--reference", ar_dir, "--out", png, "--table", table,
          "--num_samples", "8", "--steps", "8,48", "--settings", "ancestral,remdm-loop"]
  frontier.main(args)
  rows = [json.loads(line) for line in open(str(tmp_path / "frontier.jsonl"))]
  assert [(r["model"], r["setting"], r["steps"]) for r in rows] == [
      ("data", "held-out windows", 0), ("ar", "ar samples", 0), ("md4", "ancestral", 8),
      ("md4", "ancestral", 48), ("md4", "remdm-loop", 8), ("md4", "remdm-loop", 48)]
  by = {(r["setting"], r["steps"]): r for r in rows}
  assert by[("remdm-loop", 48)]["network_calls"] == 48  # one call per step
  assert by[("ancestral", 48)]["network_calls"] <= 32  # event-driven: at most L
  assert all(0 < r["entropy"] <= math.log(32) and r["gen_ppl"] > 1 for r in rows)
  text = open(table).read()
  assert "| md4 | remdm-loop | 48 | 48 |" in text and "## Verdict" in text
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  frontier.main(args)  # resumes: nothing is drawn again
  assert len(open(str(tmp_path / "frontier.jsonl")).readlines()) == len(rows)
  assert os.path.getsize(png) > 0
