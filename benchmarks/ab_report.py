"""The A/B report (benchmarks/ab.py): tables in <out>/report.md, figures <out>/ab_<corpus>.png and ab_decode.png,
and every record in <out>/ab.jsonl, all rebuilt from <out>/runs/*.json and <out>/decode.jsonl.

Every figure is a mean over seeds with the seeds' range shaded; every table cell "m (lo-hi)" is the mean and
range over seeds. A difference between two families counts only where their ranges do not overlap.

Run: python benchmarks/ab_report.py --out runs/ab   (ab.py calls it at its end)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections import defaultdict

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from yanjax.core import storage  # noqa: E402
from yanjax.scaling.plot import family_style, save_png  # noqa: E402

FAMILY_ORDER = ("mcsd", "selective", "mcsd_dd", "attention", "hybrid")  # tables and colours, in every figure the same
SIZE_STYLES = ("-", "--", ":")
AXES = (("tokens", "training tokens", "log"), ("flops", "training FLOPs", "log"),
        ("seconds", "training seconds (CPU, compile and evaluation excluded)", "log"))


def load(out: pathlib.Path) -> tuple[list[dict], list[dict]]:
  """(run records, decode records) of an A/B directory, in report order (`_order`)."""
  runs = [json.loads(path.read_text()) for path in (out / "runs").glob("*.json")]
  decode_file = out / "decode.jsonl"
  decode = [json.loads(line) for line in decode_file.read_text().splitlines()] if decode_file.exists() else []
  return sorted(runs, key=_order), sorted(decode, key=_order)


def _order(record: dict) -> tuple:
  """Corpus, size (by width), family (FAMILY_ORDER first), then seed or context."""
  family = record["family"]
  rank = FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)
  return (record.get("corpus", ""), int(record["size"][1:]), rank, family, record.get("seed", record.get("context")))


def group(runs: list[dict]) -> dict[tuple[str, str], dict[str, list[dict]]]:
  """(corpus, size) -> family -> its runs (one per seed), in the order first seen."""
  groups: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
  for run in runs:
    groups[(run["corpus"], run["size"])][run["family"]].append(run)
  return groups


def at(run: dict, x_key: str, x: float, y_key: str = "val_loss") -> float:
  """`y_key` of `run`'s curve at `x` (linear in log x between evaluations); nan outside the curve."""
  xs = np.array([p[x_key] for p in run["curve"]], float)
  ys = np.array([p[y_key] for p in run["curve"]], float)
  if x < xs[0] or x > xs[-1]:
    return float("nan")
  return float(np.interp(np.log(x), np.log(xs), ys))


def reach(run: dict, target: float, x_key: str) -> float:
  """The first `x_key` at which `run`'s validation loss falls to `target` (interpolated); nan if never."""
  curve = run["curve"]
  for before, after in zip(curve, curve[1:]):
    if after["val_loss"] <= target < before["val_loss"]:
      share = (before["val_loss"] - target) / (before["val_loss"] - after["val_loss"])
      return before[x_key] + share * (after[x_key] - before[x_key])
  return float(curve[0][x_key]) if curve[0]["val_loss"] <= target else float("nan")


def spread(values) -> tuple[float, float, float]:
  """(mean, min, max) of the finite `values`; nans if none."""
  values = np.array([v for v in values if np.isfinite(v)], float)
  if not values.size:
    return (float("nan"),) * 3
  return float(values.mean()), float(values.min()), float(values.max())


def cell(values, fmt: str = "{:.3f}") -> str:
  mean, low, high = spread(values)
  if not np.isfinite(mean):
    return "not reached"
  missing = "" if len([v for v in values if np.isfinite(v)]) == len(values) else " (some seeds not reached)"
  return f"{fmt.format(mean)} ({fmt.format(low)}-{fmt.format(high)}){missing}"


def bits_per_byte(runs: list[dict]) -> str:
  """The runs' final validation bits per byte; "n/a" for records written before it was measured."""
  values = [r["val_bits_per_byte"] for r in runs if "val_bits_per_byte" in r]
  return cell(values) if len(values) == len(runs) else "n/a"


def separated(a, b) -> bool:
  """Whether two families' seed ranges do not overlap."""
  _, a_low, a_high = spread(a)
  _, b_low, b_high = spread(b)
  return a_high < b_low or b_high < a_low


def tables(runs: list[dict]) -> list[str]:
  """The markdown tables of the training runs, one section per (corpus, size)."""
  lines = []
  for (corpus, size), families in group(runs).items():
    first = next(iter(families.values()))[0]
    lines += [f"### {corpus}, {size}", "",
              f"{first['steps']} steps of {first['tokens'] // first['steps']:,} tokens in sequences of "
              f"{first['settings']['seq_len']}; seeds "
              f"{sorted({r['seed'] for rs in families.values() for r in rs})}.", ""]
    equal_flops = min(np.mean([r["curve"][-1]["flops"] for r in rs]) for rs in families.values())
    target = max(r["val_loss"] for rs in families.values() for r in rs)
    reference = families.get("mcsd")
    lines += [f"Equal FLOPs: {equal_flops:.3g} (the family with the fewest FLOPs at the last step). Target loss: "
              f"{target:.3f} (the worst run's final loss, which every run reaches).", "",
              "| family | params (active) | val loss at equal tokens | vs mcsd | val loss at equal FLOPs "
              "| val bits per byte | next-token accuracy | tokens to target | seconds to target | train tokens/s |",
              "| --- | ---: | ---: | :-: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for family, family_runs in families.items():
      losses = [r["val_loss"] for r in family_runs]
      versus = "" if reference is None or family == "mcsd" else (
          f"{np.mean(losses) - np.mean([r['val_loss'] for r in reference]):+.3f}" +
          (" (one seed: no range)" if min(len(losses), len(reference)) < 2 else
           " (beyond seed range)" if separated(losses, [r["val_loss"] for r in reference]) else " (within)"))
      lines.append(
          f"| {family} | {family_runs[0]['params']:,} ({family_runs[0]['active_params']:,}) "
          f"| {cell(losses)} | {versus} | {cell([at(r, 'flops', equal_flops) for r in family_runs])} "
          f"| {bits_per_byte(family_runs)} | {cell([r['val_accuracy'] for r in family_runs], '{:.4f}')} "
          f"| {cell([reach(r, target, 'tokens') for r in family_runs], '{:,.0f}')} "
          f"| {cell([reach(r, target, 'seconds') for r in family_runs], '{:.1f}')} "
          f"| {cell([r['tokens_per_s'] for r in family_runs], '{:,.0f}')} |")
    lines.append("")
  return lines


def decode_table(decode: list[dict]) -> list[str]:
  lines = ["| size | family | context | ms per token | tokens/s | decode state KiB |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
  lines += [f"| {r['size']} | {r['family']} | {r['context']:,} | {r['ms_per_token']} | {r['tokens_per_s']:,} "
            f"| {r['state_bytes'] / 1024:,.1f} |" for r in decode]
  return lines


def plot_curves(corpus: str, runs: list[dict], path: pathlib.Path):
  """Validation loss against tokens, FLOPs and seconds: a line per (family, size), seeds' range shaded."""
  fig = Figure(figsize=(17, 4.8))
  axes = fig.subplots(1, len(AXES), sharey=True)
  groups = {key: fams for key, fams in group(runs).items() if key[0] == corpus}
  families = list(dict.fromkeys([*FAMILY_ORDER, *(f for fams in groups.values() for f in fams)]))
  sizes = list(dict.fromkeys(size for _, size in groups))
  for (_, size), fams in groups.items():
    for family, family_runs in fams.items():
      colour = family_style(families.index(family))[0](0.7)
      style = SIZE_STYLES[sizes.index(size) % len(SIZE_STYLES)]
      steps = min(len(r["curve"]) for r in family_runs)
      losses = np.array([[p["val_loss"] for p in r["curve"][:steps]] for r in family_runs])
      for ax, (x_key, _, _) in zip(axes, AXES):
        xs = np.mean([[p[x_key] for p in r["curve"][:steps]] for r in family_runs], axis=0)
        ax.plot(xs, losses.mean(0), style, color=colour)
        ax.fill_between(xs, losses.min(0), losses.max(0), color=colour, alpha=0.2, linewidth=0)
  for ax, (_, label, scale) in zip(axes, AXES):
    ax.set_xscale(scale)
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # decade labels only: the minor ones overlap
    ax.set_xlabel(label)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_ylabel("validation loss (nats per token)")
  handles = [Line2D([], [], color=family_style(i)[0](0.7), label=f) for i, f in enumerate(families)]
  handles += [Line2D([], [], color="grey", linestyle=SIZE_STYLES[i % 3], label=s) for i, s in enumerate(sizes)]
  axes[-1].legend(handles=handles, loc="upper right")
  fig.suptitle(f"A/B on {corpus}: mean over seeds, seeds' range shaded")
  save_png(fig, path)


def plot_decode(decode: list[dict], path: pathlib.Path):
  """Decode state bytes and tokens/s against context, a line per (family, size)."""
  fig = Figure(figsize=(12, 4.5))
  axes = fig.subplots(1, 2)
  families = list(dict.fromkeys([*FAMILY_ORDER, *(r["family"] for r in decode)]))
  sizes = list(dict.fromkeys(r["size"] for r in decode))
  for family in families:
    for size in sizes:
      rows = [r for r in decode if r["family"] == family and r["size"] == size]
      colour = family_style(families.index(family))[0](0.7)
      style = SIZE_STYLES[sizes.index(size) % len(SIZE_STYLES)]
      contexts = [r["context"] for r in rows]
      axes[0].plot(contexts, [r["state_bytes"] for r in rows], style, marker="o", color=colour,
                   label=f"{family} {size}")
      axes[1].plot(contexts, [r["tokens_per_s"] for r in rows], style, marker="o", color=colour)
  for ax, label in zip(axes, ("decode state bytes (batch 1)", "decode tokens/s (batch 1, CPU)")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize="small")
  save_png(fig, path)


def write_report(out: pathlib.Path) -> pathlib.Path:
  """Writes ab.jsonl, the figures and report.md under `out`; returns the report's path."""
  runs, decode = load(out)
  storage.write_atomic(out / "ab.jsonl", "".join(json.dumps(r) + "\n" for r in runs + decode).encode())
  lines = ["# A/B report", "", "Written by benchmarks/ab_report.py from the runs of benchmarks/ab.py. Cells: mean "
           "(min-max) over seeds. A difference counts where the seed ranges do not overlap.", ""]
  for corpus in dict.fromkeys(r["corpus"] for r in runs):
    plot_curves(corpus, [r for r in runs if r["corpus"] == corpus], out / f"ab_{corpus}.png")
    lines.append(f"![{corpus}](ab_{corpus}.png)")
  lines += ["", *tables(runs)]
  if decode:
    plot_decode(decode, out / "ab_decode.png")
    lines += ["## Decode cost by context", "", "![decode](ab_decode.png)", "", *decode_table(decode), ""]
  report = out / "report.md"
  storage.write_atomic(report, "\n".join(lines).encode())
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="the directory benchmarks/ab.py wrote")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  if not list((out / "runs").glob("*.json")):
    print(f"error: no A/B runs in {out / 'runs'}: run benchmarks/ab.py --out {out} first", file=sys.stderr)
    return 2
  print(f"report: {write_report(out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
