"""The quality/diversity frontier of the samplers: generative perplexity under an AR reference
against mean unigram entropy, for every sampler setting and step count.

  python -m md4.tools.frontier --md4 runs/md4_demo --genmd4 runs/genmd4_demo \
      --reference runs/ar_demo --out docs/images/frontier.png --table docs/frontier.md

Each (model, setting, steps) draws --num_samples sequences with the model's EMA weights
(sampling.* set as the setting says, the rest as the run was trained); rows are appended to
--results (JSONL) as they finish, so an interrupted run resumes where it stopped. Reference
points: the held-out windows of the data (of the first model's run) and the AR model's own
samples. The table ends with the verdict on the claim "some setting reaches a lower gen-PPL than
ancestral sampling at an entropy within 2% of the data's".
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Sequence

import jax
import matplotlib
import ml_collections
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from md4 import config_lib
from md4.data import tokenizers
from md4.evaluation import evaluate
from md4.evaluation.reference import check_reference_tokenizer, load_reference
from md4.training.run import TOKENIZER_FILE, load_for_inference

STEPS = (8, 16, 48, 128, 256)
BAND = 0.02  # "entropy within 2% of the data's"


@dataclasses.dataclass(frozen=True)
class Setting:
  """A sampler setting: its name and the sampling.* overrides; `models` it applies to."""

  name: str
  overrides: dict
  models: tuple[str, ...] = ("md4", "genmd4")


def settings() -> list[Setting]:
  """Ancestral; ReMDM's four schedules at the etas of the paper's scripts (cap 0.008, rescale
  0.015, loop 0.02; conf has none); confidence order with each score at Gumbel temperature 0
  and 1; blocks of 16 around the ancestral sampler; ancestral with nucleus (top-p 0.9)."""
  out = [Setting("ancestral", {"method": "ancestral"})]
  for schedule, eta in (("cap", 0.008), ("rescale", 0.015), ("loop", 0.02), ("conf", 0.02)):
    out.append(Setting(f"remdm-{schedule}", {"method": "remdm", "remask_schedule": schedule,
                                             "eta": eta}, ("md4",)))
  for score in ("max_prob", "margin", "neg_entropy"):
    for gumbel in (0.0, 1.0):
      out.append(Setting(f"conf-{score}-g{gumbel:g}", {"method": "confidence",
                                                        "confidence": score,
                                                        "gumbel_temperature": gumbel}))
  out.append(Setting("blocks16-ancestral", {"method": "ancestral", "block_size": 16}))
  out.append(Setting("ancestral-top_p0.9", {"method": "ancestral", "top_p": 0.9}))
  return out


def sample_metrics(samples: np.ndarray, nll_fn) -> dict:
  """Generative perplexity (with the standard error of its log) and mean unigram entropy."""
  report = evaluate.generative_perplexity(samples, nll_fn)
  entropy = evaluate.unigram_entropy(samples)
  return {**report, "entropy": float(entropy.mean()),
          "entropy_se": float(entropy.std(ddof=1) / math.sqrt(len(entropy)))}


def read_results(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def append_result(path: str, row: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
  print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
        flush=True)


def model_rows(name: str, workdir: str, nll_fn, *, num_samples: int, steps: Sequence[int],
               wanted: set[str] | None, done: set[tuple], results: str, seed: int) -> None:
  """Samples of the run in `workdir` for every setting and step count not yet in `done`."""
  config = config_lib.load(workdir)
  run, state, step = load_for_inference(config, workdir, with_data=False)
  for setting in settings():
    if name not in setting.models or (wanted and setting.name not in wanted):
      continue
    for num_steps in steps:
      if (name, setting.name, num_steps) in done:
        continue
      run.method.config.sampling.update(num_steps=num_steps, **{**_defaults(), **setting.overrides})
      draw = jax.jit(functools.partial(run.method.sample_with_calls), static_argnums=2)
      tick = time.perf_counter()
      samples, calls = draw(state["ema"], jax.random.key(seed), num_samples)
      samples = np.asarray(samples)
      seconds = time.perf_counter() - tick
      append_result(results, {"model": name, "setting": setting.name, "steps": num_steps,
                              "num_samples": num_samples, "network_calls": int(calls),
                              "train_step": step, "seconds": seconds,
                              **sample_metrics(samples, nll_fn)})


def _defaults() -> dict:
  """The sampler fields a setting may change, at their base() values."""
  s = config_lib.base().sampling
  keys = ("method", "remask_schedule", "eta", "confidence", "gumbel_temperature", "block_size",
          "tokens_per_step", "top_p")
  return {k: s[k] for k in keys}


def reference_rows(data_workdir: str, reference_workdir: str, nll_fn, *, num_samples: int,
                   done: set[tuple], results: str, seed: int) -> None:
  """The data's held-out windows and the AR model's own samples."""
  if ("data", "held-out windows", 0) not in done:
    run, _, _ = load_for_inference(config_lib.load(data_workdir), data_workdir)
    windows = np.concatenate([np.asarray(b["tokens"]) for b in run.data.eval_batches()])
    if len(windows) < num_samples:
      raise ValueError(f"{data_workdir}: {len(windows)} held-out windows, fewer than "
                       f"--num_samples {num_samples}")
    # Evenly spaced over the held-out split (neighbouring windows come from the same scene).
    pick = np.linspace(0, len(windows) - 1, num_samples).astype(int)
    append_result(results, {"model": "data", "setting": "held-out windows", "steps": 0,
                            "num_samples": num_samples, "network_calls": 0,
                            **sample_metrics(windows[pick], nll_fn)})
  if ("ar", "ar samples", 0) not in done:
    config = config_lib.load(reference_workdir)
    run, state, step = load_for_inference(config, reference_workdir, with_data=False)
    samples = np.asarray(jax.jit(run.method.sample, static_argnums=2)(
        state["ema"], jax.random.key(seed), num_samples))
    append_result(results, {"model": "ar", "setting": "ar samples", "steps": 0,
                            "num_samples": num_samples, "network_calls": config.seq_len,
                            "train_step": step, **sample_metrics(samples, nll_fn)})


def _with_reference(workdir: str, reference_workdir: str) -> ml_collections.ConfigDict:
  """The run's saved config, scored by the AR run in `reference_workdir`."""
  config = config_lib.load(workdir)
  config.eval.reference_workdir = reference_workdir
  return config


def _check_tokenizer(workdir: str, reference_workdir: str) -> None:
  """A run's learned tokenizer (if any) must be the reference's."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  if os.path.isfile(path):
    kind = config_lib.load(workdir).data.tokenizer
    check_reference_tokenizer(_with_reference(workdir, reference_workdir),
                              tokenizers.LEARNED[kind].load(path))


# ---------------------------------------------------------------------------------------------
# Report: the plot, the table and the verdict.


def verdict(rows: list[dict]) -> list[str]:
  """Per model: the ancestral rows and the other rows whose entropy is within BAND of the
  data's, and whether some other setting beats every ancestral one in the band."""
  data = next(r for r in rows if r["model"] == "data")
  lo, hi = (1 - BAND) * data["entropy"], (1 + BAND) * data["entropy"]
  lines = [f"Data entropy {data['entropy']:.4f} nats: the band is [{lo:.4f}, {hi:.4f}]."]
  for model in sorted({r["model"] for r in rows} - {"data", "ar"}):
    band = [r for r in rows if r["model"] == model and lo <= r["entropy"] <= hi]
    ancestral = [r for r in band if r["setting"] == "ancestral"]
    others = sorted((r for r in band if r["setting"] != "ancestral"),
                    key=lambda r: r["gen_nats_per_token"])
    if not ancestral:
      lines.append(f"{model}: no ancestral row lies in the band; the claim cannot be tested.")
      continue
    best = min(ancestral, key=lambda r: r["gen_nats_per_token"])
    head = (f"{model}: best ancestral in the band: gen-PPL {best['gen_ppl']:.2f} "
            f"({best['steps']} steps, entropy {best['entropy']:.4f}).")
    if not others:
      lines.append(head + " No other setting lies in the band.")
      continue
    top = others[0]
    se = math.hypot(top["gen_nats_per_token_se"], best["gen_nats_per_token_se"])
    gap = best["gen_nats_per_token"] - top["gen_nats_per_token"]
    result = ("lower, by more than 2 standard errors: the claim holds" if gap > 2 * se else
              "lower, but within 2 standard errors: not established" if gap > 0 else
              "not lower: the claim is refuted for this model")
    lines.append(head + f" Best other in the band: {top['setting']} at {top['steps']} steps, "
                 f"gen-PPL {top['gen_ppl']:.2f} (entropy {top['entropy']:.4f}): {result} "
                 f"(difference {gap:.4f} nats/token, SE {se:.4f}).")
  return lines


def write_table(rows: list[dict], path: str, command: str) -> None:
  header = ("| model | setting | steps | network calls | gen-PPL | log gen-PPL SE | entropy "
            "(nats) | in band |\n|---|---|---|---|---|---|---|---|\n")
  data = next(r for r in rows if r["model"] == "data")
  lines = []
  for r in rows:
    in_band = abs(r["entropy"] - data["entropy"]) <= BAND * data["entropy"]
    lines.append(f"| {r['model']} | {r['setting']} | {r['steps'] or '-'} | {r['network_calls']} | "
                 f"{r['gen_ppl']:.2f} | {r['gen_nats_per_token_se']:.3f} | {r['entropy']:.4f} | "
                 f"{'yes' if in_band else ''} |")
  sizes = sorted({r["num_samples"] for r in rows})
  trained = sorted({(r["model"], r["train_step"]) for r in rows if "train_step" in r})
  text = (f"# Sampler frontier on the demo corpus\n\nGenerated by\n\n    {command}\n\n"
          f"Checkpoints (EMA weights): {', '.join(f'{m} at step {s}' for m, s in trained)}. "
          f"Samples per row: {', '.join(map(str, sizes))}. gen-PPL: perplexity of the samples "
          "under the AR reference (exp of its mean NLL per token); entropy: the mean over samples "
          "of the unigram entropy of each sample's tokens; network calls: per sample, for "
          "the whole batch (guided samplers would count two per call).\n\n" + header
          + "\n".join(lines) + "\n\n## Verdict\n\n" + "\n".join(f"- {v}" for v in verdict(rows))
          + "\n")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def plot(rows: list[dict], path: str) -> None:
  """gen-PPL (log scale) against entropy; one marker style per model, one colour per setting."""
  fig = Figure(figsize=(9, 6), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  names = sorted({r["setting"] for r in rows if r["model"] not in ("data", "ar")})
  palette = matplotlib.colormaps["tab20"]
  colours = {n: palette(i % 20) for i, n in enumerate(names)}
  markers = {"md4": "o", "genmd4": "s"}
  for model, marker in markers.items():
    for name in names:
      pts = sorted((r for r in rows if r["model"] == model and r["setting"] == name),
                   key=lambda r: r["steps"])
      if pts:
        ax.plot([p["entropy"] for p in pts], [p["gen_ppl"] for p in pts], marker=marker,
                color=colours[name], linestyle="-" if model == "md4" else ":", markersize=4,
                label=f"{model} {name}")
  data = next(r for r in rows if r["model"] == "data")
  ax.axvspan((1 - BAND) * data["entropy"], (1 + BAND) * data["entropy"], color="0.9")
  for r in rows:
    if r["model"] in ("data", "ar"):
      ax.plot(r["entropy"], r["gen_ppl"], marker="*", markersize=14, color="k" if
              r["model"] == "data" else "r", linestyle="", label=r["setting"])
  ax.set_yscale("log")
  ax.set_xlabel("mean unigram entropy (nats)")
  ax.set_ylabel("generative perplexity under the AR reference")
  ax.set_title("Samplers at 8-256 steps (line order: steps); grey band: data entropy +-2%")
  ax.legend(fontsize=6, ncol=2, loc="best")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--md4", required=True, help="an MD4 run's workdir")
  p.add_argument("--genmd4", help="a GenMD4 run's workdir")
  p.add_argument("--reference", required=True, help="the AR reference run's workdir")
  p.add_argument("--out", required=True, help="the PNG plot")
  p.add_argument("--table", required=True, help="the markdown table")
  p.add_argument("--results", help="the rows (JSONL); default: --table with .jsonl")
  p.add_argument("--num_samples", type=int, default=256)
  p.add_argument("--steps", default=",".join(map(str, STEPS)))
  p.add_argument("--settings", default="", help="comma-separated setting names (default: all)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  results = args.results or os.path.splitext(args.table)[0] + ".jsonl"
  steps = [int(s) for s in args.steps.split(",")]
  wanted = set(filter(None, args.settings.split(","))) or None
  command = "python -m md4.tools.frontier " + " ".join(sys.argv[1:] if argv is None else argv)
  try:
    nll_fn = load_reference(_with_reference(args.md4, args.reference))
    for workdir in filter(None, (args.md4, args.genmd4)):
      _check_tokenizer(workdir, args.reference)
    done = {(r["model"], r["setting"], r["steps"]) for r in read_results(results)
            if r["num_samples"] == args.num_samples}
    reference_rows(args.md4, args.reference, nll_fn, num_samples=args.num_samples, done=done,
                   results=results, seed=args.seed)
    for name, workdir in (("md4", args.md4), ("genmd4", args.genmd4)):
      if workdir:
        model_rows(name, workdir, nll_fn, num_samples=args.num_samples, steps=steps,
                   wanted=wanted, done=done, results=results, seed=args.seed)
  except (config_lib.ConfigError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  rows = [r for r in read_results(results) if r["num_samples"] == args.num_samples]
  plot(rows, args.out)
  write_table(rows, args.table, command)
  print("\n".join(verdict(rows)))


if __name__ == "__main__":
  main()
