"""Same-run comparison of this tree with an earlier git revision, on one config: the compiled
training step's time, and held-out bits/char after a short training.

  python -m md4.tools.bench_revision step  --before dfa7aca --config configs/demo.py --rounds 3
  python -m md4.tools.bench_revision train --before dfa7aca --config configs/demo.py \
      --steps 1000 --seeds 0 1 --workdir runs/revision_cmp

The revision is exported (`git archive`) to a temporary directory that shares this tree's data/;
each measurement runs in a subprocess of that tree or of this one, alternating. `step` times the
config's compiled training step on random tokens (best of `--rounds` rounds, each the best of
`md4.tools.bench.best_time`'s repeats). `train` trains the config for `--steps` (its schedule
shortened to them, no sampling) with each seed in each tree and reads the last held-out
bits/char (EMA) from metrics.jsonl. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
TREES = ("before", "after")


def export_revision(revision: str, into: pathlib.Path) -> pathlib.Path:
  """The files of `revision` under `into`, with this tree's data/ linked in."""
  archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], check=True,
                           capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
  if (REPO / "data").exists():
    (into / "data").symlink_to(REPO / "data")
  return into


def run_in(tree: pathlib.Path, args: list[str]) -> str:
  """stdout of `python ARGS` run in `tree` (its md4 imported), or the failure in one line."""
  done = subprocess.run([sys.executable, *args], cwd=tree, capture_output=True, text=True)
  if done.returncode:
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    sys.exit(f"error: {' '.join(args[:2])} failed in {tree}: {last}")
  return done.stdout


def step_seconds(tree: pathlib.Path, config: str) -> dict:
  """One timing of `config`'s compiled training step in `tree` (its own md4.tools.bench)."""
  code = ("import json, runpy, sys\n"
          "import numpy as np\n"
          "from md4.tools import bench\n"
          "config = runpy.run_path(sys.argv[1])['get_config']()\n"
          "rng = np.random.default_rng(0)\n"
          "tokens = rng.integers(0, config.vocab_size, (config.training.batch_size, "
          "config.seq_len)).astype(np.int32)\n"
          "print(json.dumps(bench.time_train_step(config, tokens)))\n")
  return json.loads(run_in(tree, ["-c", code, config]).strip().splitlines()[-1])


def final_bits_per_char(workdir: pathlib.Path) -> float:
  """The last held-out bits/char of EMA weights in workdir/metrics.jsonl."""
  with open(workdir / "metrics.jsonl") as f:
    evals = [r for r in map(json.loads, f)
             if r.get("split") == "eval" and r.get("weights") == "ema" and "bits_per_char" in r]
  return evals[-1]["bits_per_char"]


def cmd_step(args, trees: dict) -> dict:
  rounds = {name: [] for name in TREES}
  for _ in range(args.rounds):
    for name in TREES:
      rounds[name].append(step_seconds(trees[name], args.config)["step_s"])
  best = {name: min(times) for name, times in rounds.items()}
  for name in TREES:
    print(f"{name}: {best[name] * 1e3:.1f} ms/step "
          f"(rounds {[round(t * 1e3, 1) for t in rounds[name]]})")
  return {"step_s": best, "rounds": rounds, "after_over_before": best["after"] / best["before"]}


def cmd_train(args, trees: dict) -> dict:
  results = {}
  for seed in args.seeds:
    for name in TREES:
      workdir = (pathlib.Path(args.workdir) / f"{name}_seed{seed}").resolve()
      s = args.steps
      run_in(trees[name], ["main.py", f"--config={args.config}", f"--workdir={workdir}",
                           f"--config.seed={seed}", f"--config.training.num_steps={s}",
                           f"--config.training.eval_every={s}",
                           f"--config.training.checkpoint_every={s}",
                           "--config.sampling.every=0"])
      results[f"{name}_seed{seed}"] = final_bits_per_char(workdir)
      print(f"{name} seed {seed}: held-out {results[f'{name}_seed{seed}']:.4f} bits/char")
  return {"steps": args.steps, "bits_per_char": results}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  for name in ("step", "train"):
    command = sub.add_parser(name)
    command.add_argument("--before", required=True, help="git revision to compare with")
    command.add_argument("--config", default="configs/demo.py")
  sub.choices["step"].add_argument("--rounds", type=int, default=3)
  sub.choices["train"].add_argument("--steps", type=int, default=1000)
  sub.choices["train"].add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  sub.choices["train"].add_argument("--workdir", default="runs/revision_cmp")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    try:
      before = export_revision(args.before, pathlib.Path(tmp))
    except subprocess.CalledProcessError as e:
      sys.exit(f"error: cannot export revision {args.before!r}: "
               f"{e.stderr.decode().strip().splitlines()[-1] if e.stderr else e}")
    trees = {"before": before, "after": REPO}
    result = {"step": cmd_step, "train": cmd_train}[args.cmd](args, trees)
  print(json.dumps({"before": args.before, "config": args.config, **result}))


if __name__ == "__main__":
  main()
