"""Recall benchmark: multi-query associative recall (MQAR, yanjax/eval/mqar.py) learned from scratch by every family
of the A/B benchmark (MCSD, MCSD with selective activation, MCSD with data-dependent decay, attention, the hybrid),
no download.

For every sequence length, width and family it trains one model from scratch with the project's trainer
(yanjax/training/: the same optimizer, schedule and train step as every run) on a mixture of the pair counts
that fit the length (row i of a batch holds pairs[i % len(pairs)]), then measures its accuracy on the value
after each query key, separately for every pair count, on held-out batches (the eval split's random stream).
MQAR asks a model to hold N key-value pairs until they are queried: it measures what a mixer's state can keep.
Training accuracy is also recorded every --eval_every steps (the run record's "curve") on one fixed mixed batch.

Writes <out>/runs/<family>-w<width>-t<seq_len>-s<seed>.json (one per trained model, whole or not at all; a re-run
skips finished runs), then <out>/recall.jsonl (a line per family, width, length and pair count), the tables
<out>/recall.md and the figure <out>/recall.png (accuracy against pairs, a line per family in the A/B report's
colours, a line style per width, a panel per length). Prints each line of recall.jsonl as it is measured.

Run: python benchmarks/recall.py --out runs/recall [--families mcsd,selective,mcsd_dd,attention,hybrid]
     [--widths 32,64] [--seq_lens 32] [--pairs 1,2,4,8] [--vocab 64] [--steps 2000] [--lr 1e-2]

The defaults are the settings docs/results/recall.md measured on a 2-core CPU (about 7 minutes for the 8 runs);
Zoology's scale (--seq_lens 64,128,256 --pairs 4,8,16,32,64 --vocab 8192, far more steps) wants a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import shlex
import sys

import jax
import numpy as np
from flax import nnx
from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ab import CONFIG, FAMILIES, Curve, _ints, _names, refuse_other_settings  # noqa: E402  (benchmarks/, beside this file)
from ab_report import FAMILY_ORDER, SIZE_STYLES  # noqa: E402

from yanjax.core import storage  # noqa: E402
from yanjax.core.config import load_config_file  # noqa: E402
from yanjax.core.errors import UserError  # noqa: E402
from yanjax.eval import mqar  # noqa: E402
from yanjax.model.counting import param_count  # noqa: E402
from yanjax.scaling.plot import family_style, save_png  # noqa: E402
from yanjax.training.loop import TrainLoop  # noqa: E402
from yanjax.training.presets import model_variant  # noqa: E402
from yanjax.training.run_config import validate_run_config  # noqa: E402
from yanjax.training.trainer import build_trainer  # noqa: E402

SETTINGS = ("vocab", "layers", "steps", "batch", "lr", "warmup_steps", "eval_every", "eval_batches", "power")


def model_overrides(width: int, args) -> dict:
  """configs/yan_tiny.py's Yan model resized (4 channels, FFN 3x the width, as benchmarks/ab.py's sizes)."""
  return dict(vocab_size=args.vocab, width=width, channels=4, mlp_width=3 * width, layers=args.layers)


def run_config(family: str, width: int, seq_len: int, seed: int, args):
  """The run config of one recall run: configs/yan_tiny.py's training settings, the family's model at `width`."""
  cfg = load_config_file(str(CONFIG))
  cfg.model.update(model_variant({**cfg.model.to_dict(), **model_overrides(width, args)}, FAMILIES[family],
                                 seq_len).to_dict())
  cfg.train.update(dict(seq_len=seq_len, global_batch=args.batch, seed=seed, steps=args.steps, sample_tokens=0,
                        compilation_cache=""))
  cfg.optimizer.update(dict(lr=args.lr, warmup_steps=args.warmup_steps))
  cfg.data.prepare_default = False  # no data: batches come from yanjax/eval/mqar.py
  return cfg


def fitting_pairs(seq_len: int, pairs: list[int]) -> list[int]:
  """The pair counts a row of `seq_len` holds (4 tokens a pair); a UserError if none."""
  fit = [n for n in pairs if 4 * n <= seq_len]
  if not fit:
    raise UserError(f"--pairs={','.join(map(str, pairs))}: none fits --seq_lens {seq_len} (4 tokens a pair)")
  return fit


def train_run(cfg, seq_len: int, pairs: list[int], args) -> dict:
  """Trains run config `cfg` on MQAR from scratch; returns its record: accuracy per pair count, curve, seconds."""
  trainer = build_trainer(cfg, jax.devices()[:1])
  task = dict(batch=args.batch, seq_len=seq_len, vocab_size=args.vocab, power=args.power)
  seed = cfg.train.seed

  @jax.jit
  def forward(params, batch):
    model = nnx.merge(trainer.graphdef, params)
    return model(batch["inputs"], batch["segment_ids"], batch["positions"])[0]

  def evaluate(params, batches) -> float:  # every batch holds the same number of queries: the mean is exact
    return float(np.mean([mqar.accuracy(jax.device_get(forward(params, trainer.to_global(b))), b) for b in batches]))

  curve_batch = [mqar.make_batch(seed, 0, pairs=pairs, split="eval", **task)]
  clock = Curve(lambda info: {"loss": float(info.metrics["loss"]),
                              "accuracy": round(evaluate(info.state["params"], curve_batch), 4)}, args.eval_every)
  loop = TrainLoop(trainer, cfg.train)
  loop.add_hook(clock, every=1)
  batches = (mqar.make_batch(seed, step, pairs=pairs, **task) for step in itertools.count())
  info = loop.run(trainer.init(), 0, batches)
  params = info.state["params"]
  accuracy = {str(n): round(evaluate(params, [mqar.make_batch(seed, step, pairs=[n], split="eval", **task)
                                              for step in range(1, 1 + args.eval_batches)]), 4) for n in pairs}
  count = param_count(trainer.model_cfg)
  return {"params": count.total, "active_params": count.active, "train_pairs": pairs, "steps": cfg.train.steps,
          "compile_seconds": round(clock.compile_seconds, 3), "train_seconds": round(clock.train_seconds, 3),
          "final_loss": clock.points[-1]["loss"], "accuracy": accuracy, "curve": clock.points}


def run_path(out: pathlib.Path, family: str, width: int, seq_len: int, seed: int) -> pathlib.Path:
  return out / "runs" / f"{family}-w{width}-t{seq_len}-s{seed}.json"


def lines_of(run: dict) -> list[dict]:
  """The recall.jsonl lines of one run record: one per pair count."""
  return [{"family": run["family"], "width": run["width"], "seq_len": run["seq_len"], "pairs": int(n),
           "accuracy": accuracy, "steps": run["steps"], "seconds": run["train_seconds"], "params": run["params"]}
          for n, accuracy in run["accuracy"].items()]


def _order(run: dict) -> tuple:
  family = run["family"]
  return (run["seq_len"], FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER), family,
          run["width"])


def tables(runs: list[dict]) -> list[str]:
  """A markdown table per sequence length: a row per (family, width), a column per pair count."""
  lines = []
  for seq_len in sorted({r["seq_len"] for r in runs}):
    rows = [r for r in runs if r["seq_len"] == seq_len]
    pairs = sorted({int(n) for r in rows for n in r["accuracy"]})
    lines += [f"### Sequence length {seq_len}", "",
              "| family | width | params | " + " | ".join(f"{n} pairs" for n in pairs) + " | train seconds |",
              "| --- | ---: | ---: | " + " | ".join("---:" for _ in pairs) + " | ---: |"]
    for r in rows:
      cells = [f"{r['accuracy'][str(n)]:.3f}" if str(n) in r["accuracy"] else "" for n in pairs]
      lines.append(f"| {r['family']} | {r['width']} | {r['params']:,} | " + " | ".join(cells) +
                   f" | {r['train_seconds']:.1f} |")
    lines.append("| (chance: one of the row's values at random) | | | " + " | ".join(f"{1 / n:.3f}" for n in pairs) +
                 " | |")
    lines.append("")
  return lines


def plot(runs: list[dict], path: pathlib.Path):
  """Accuracy against pairs: a panel per sequence length, a line per (family, width)."""
  seq_lens = sorted({r["seq_len"] for r in runs})
  families = list(dict.fromkeys([*FAMILY_ORDER, *(r["family"] for r in runs)]))
  widths = sorted({r["width"] for r in runs})
  fig = Figure(figsize=(5.5 * len(seq_lens) + 1, 4.5))
  axes = np.atleast_1d(fig.subplots(1, len(seq_lens), sharey=True))
  for ax, seq_len in zip(axes, seq_lens):
    for r in (r for r in runs if r["seq_len"] == seq_len):
      pairs = sorted(int(n) for n in r["accuracy"])
      ax.plot(pairs, [r["accuracy"][str(n)] for n in pairs], SIZE_STYLES[widths.index(r["width"]) % 3],
              marker="o", color=family_style(families.index(r["family"]))[0](0.7))
    pairs = sorted({int(n) for r in runs if r["seq_len"] == seq_len for n in r["accuracy"]})
    ax.plot(pairs, [1 / n for n in pairs], ":", color="grey", lw=1)  # chance: one of the row's values
    ax.set_xscale("log", base=2)
    ax.set_xticks(pairs, [str(n) for n in pairs])
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set(title=f"sequence length {seq_len}", xlabel="key-value pairs", ylim=(-0.02, 1.02))
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_ylabel("MQAR accuracy (held-out queries)")
  shown = [f for f in families if any(r["family"] == f for r in runs)]
  handles = [Line2D([], [], color=family_style(families.index(f))[0](0.7), label=f) for f in shown]
  handles += [Line2D([], [], color="grey", linestyle=SIZE_STYLES[i % 3], label=f"width {w}")
              for i, w in enumerate(widths)]
  handles.append(Line2D([], [], color="grey", linestyle=":", lw=1, label="chance: 1 / pairs"))
  axes[-1].legend(handles=handles, loc="upper right", fontsize="small")
  save_png(fig, path)


def write_report(out: pathlib.Path, runs: list[dict], command: str) -> pathlib.Path:
  """Writes recall.jsonl, recall.png and recall.md under `out` from the run records; returns the report's path."""
  runs = sorted(runs, key=_order)
  storage.write_atomic(out / "recall.jsonl", "".join(json.dumps(line) + "\n" for r in runs for line in lines_of(r)))
  plot(runs, out / "recall.png")
  first = runs[0]
  settings = first["settings"]
  lines = ["# MQAR recall", "", f"Command: `{command}`", "",
           f"Every model trained from scratch for {settings['steps']} steps of {settings['batch']} rows "
           f"(lr {settings['lr']}, {settings['layers']} layers, vocabulary {settings['vocab']}) on the mixture of "
           "the pair counts its length holds; accuracy on the value after each query key, "
           f"{settings['eval_batches']} held-out batches of {settings['batch']} rows per pair count. "
           "Train seconds exclude the first (compiling) step and the curve's evaluations.", "",
           "![MQAR accuracy](recall.png)", "", *tables(runs)]
  report = out / "recall.md"
  storage.write_atomic(report, "\n".join(lines))
  return report


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="directory of the run records, the tables and the figure")
  parser.add_argument("--families", default=",".join(FAMILIES))
  parser.add_argument("--widths", default="32,64", help="model widths (multiples of 16), comma-separated")
  parser.add_argument("--seq_lens", default="32", help="one model per length; comma-separated")
  parser.add_argument("--pairs", default="1,2,4,8", help="key-value pair counts; each length trains on those "
                      "that fit (4 tokens a pair)")
  parser.add_argument("--vocab", type=int, default=64, help="vocabulary: the lower half keys, the upper values")
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--batch", type=int, default=32, help="rows per step")
  parser.add_argument("--lr", type=float, default=1e-2)
  parser.add_argument("--warmup_steps", type=int, default=100)
  parser.add_argument("--eval_every", type=int, default=200, help="steps between points of the training curve")
  parser.add_argument("--eval_batches", type=int, default=4, help="held-out batches per pair count")
  parser.add_argument("--power", type=float, default=mqar.ZOOLOGY_POWER,
                      help="query-gap exponent (Zoology's power_a; 1.0: queries uniform over the row)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  settings = {key: getattr(args, key) for key in SETTINGS}
  try:
    families = _names(args.families, FAMILIES, "families")
    widths, seq_lens, pairs = _ints(args.widths, "widths"), _ints(args.seq_lens, "seq_lens"), _ints(args.pairs, "pairs")
    for key in ("steps", "batch", "eval_every", "eval_batches", "layers"):
      if getattr(args, key) < 1:
        raise UserError(f"--{key}={getattr(args, key)}: must be >= 1")
    if args.seed < 0:
      raise UserError(f"--seed={args.seed}: must be >= 0")
    if not 0 < args.power <= 1:
      raise UserError(f"--power={args.power}: must be in (0, 1]")
    out = pathlib.Path(args.out)
    runs = list(itertools.product(seq_lens, widths, families))
    for seq_len, width, family in runs:  # every run checked before anything trains
      mqar.check_task(args.vocab, seq_len, fitting_pairs(seq_len, pairs))
      if args.batch < len(fitting_pairs(seq_len, pairs)):
        raise UserError(f"--batch={args.batch}: a batch mixes {len(fitting_pairs(seq_len, pairs))} pair counts, "
                        "give at least one row each")
      validate_run_config(run_config(family, width, seq_len, args.seed, args))
      refuse_other_settings(run_path(out, family, width, seq_len, args.seed), settings)
  except ValueError as error:  # UserError and ConfigError included
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2
  (out / "runs").mkdir(parents=True, exist_ok=True)
  records = []
  for seq_len, width, family in runs:
    path = run_path(out, family, width, seq_len, args.seed)
    if not path.exists():
      cfg = run_config(family, width, seq_len, args.seed, args)
      record = {"record": "run", "family": family, "pattern": list(cfg.model.pattern), "width": width,
                "seq_len": seq_len,
                "seed": args.seed, "settings": settings,
                **train_run(cfg, seq_len, fitting_pairs(seq_len, pairs), args)}
      storage.write_atomic(path, json.dumps(record))
    records.append(json.loads(path.read_text()))
    for line in lines_of(records[-1]):
      print(json.dumps(line), flush=True)
  command = shlex.join(["python", "benchmarks/recall.py", *argv])
  print(f"report: {write_report(out, records, command)}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
