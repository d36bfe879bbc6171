"""Scaling-law sweeps: run a grid of model sizes x token budgets (or IsoFLOP budgets), collect, fit, plot.

  python -m yanjax.sweep run    --spec configs/sweeps/tiny.py --out runs/sweep_tiny   # points one after another
  python -m yanjax.sweep launch --spec configs/sweeps/tiny.py --out runs/sweep_tiny   # writes a SLURM job array
  python -m yanjax.sweep fit    --out runs/sweep_tiny                                 # fit + figures

A spec is a Python file whose `get_sweep()` returns a dict:
  families  {family name: config spec}, e.g. {"yan": "configs/yan_tiny.py", "attention": "configs/yan_tiny.py:attention"}
  sizes     {size name: overrides of the *Yan* model}; each family's model is derived from the overridden Yan
            model (so the attention baseline stays parameter-matched at every size)
  tokens    token budgets D (every size trains on each), and/or
  isoflop   FLOP budgets C (every size trains on D = C / FLOPs-per-token tokens)
  config    {section: {key: value}} shared by every point (train, optimizer, data, ...)
Each point trains in its own workdir <out>/points/<id> (re-running resumes or skips it) and writes result.json;
<out>/results.jsonl is rebuilt from those, one record per finished point (the format docs/scaling.md reads).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import subprocess
import sys
from typing import Any, NamedTuple

from yanjax.config import ConfigError, load_config_file
from yanjax.model.counting import flops_per_token, param_count
from yanjax.presets import model_variant


class Point(NamedTuple):
  id: str
  family: str
  size: str
  flags: list[str]  # trainer flags after --workdir
  params: int
  active_params: int
  tokens: int
  flops: float
  flop_budget: float | None


def load_spec(path: str | pathlib.Path) -> dict[str, Any]:
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("yanjax_sweep_spec", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep = module.get_sweep()
  unknown = set(sweep) - {"families", "sizes", "tokens", "isoflop", "config"}
  if unknown:
    raise ConfigError(f"sweep spec {path}: unknown key(s) {sorted(unknown)}")
  if not sweep.get("tokens") and not sweep.get("isoflop"):
    raise ConfigError(f"sweep spec {path}: give token budgets ('tokens') and/or FLOP budgets ('isoflop')")
  return sweep


def points(sweep: dict[str, Any]) -> list[Point]:
  """Every (family, size, budget) point of the grid, in a fixed order."""
  out = []
  for family, config_spec in sweep["families"].items():
    path, _, variant = config_spec.partition(":")
    base = load_config_file(path)
    for section, values in sweep.get("config", {}).items():
      base[section].update(values)
    train = base.train
    tokens_per_step = train.global_batch * train.seq_len
    for size, overrides in sweep["sizes"].items():
      model = model_variant({**base.model.to_dict(), **overrides}, variant)
      fpt = flops_per_token(model, train.seq_len)
      budgets = [(d, None) for d in sweep.get("tokens", ())]
      budgets += [(c / fpt, c) for c in sweep.get("isoflop", ())]
      for tokens, budget in budgets:
        steps = max(1, math.ceil(tokens / tokens_per_step))
        point_id = f"{family}-{size}-" + (f"C{budget:.3g}" if budget else f"D{tokens:.3g}")
        flags = [f"--config={path}"] + _section_flags(sweep.get("config", {})) + [
            f"--config.model.{k}={v}" for k, v in model.to_dict().items()] + [
            f"--config.train.steps={steps}",
            f"--config.optimizer.warmup_steps={min(base.optimizer.warmup_steps, steps // 10)}",
            f"--config.train.eval_every={steps}", f"--config.checkpoint.every_steps={steps}",
            "--config.train.sample_tokens=0"]
        count = param_count(model)
        out.append(Point(point_id, family, size, flags, count.total, count.active, steps * tokens_per_step,
                         fpt * steps * tokens_per_step, budget))
  return out


def _section_flags(config: dict[str, dict[str, Any]]) -> list[str]:
  return [f"--config.{section}.{key}={value!r}" if isinstance(value, tuple) else
          f"--config.{section}.{key}={value}" for section, values in config.items() for key, value in values.items()]


def run_point(point: Point, out: pathlib.Path) -> bool:
  """Trains one point (resuming its workdir) and writes its result.json; True on success."""
  workdir = out / "points" / point.id
  result_file = workdir / "result.json"
  if result_file.exists():
    print(f"[sweep] {point.id}: done already, skipped", flush=True)
    return True
  print(f"[sweep] {point.id}: training {point.tokens:,} tokens, {point.params:,} parameters", flush=True)
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / "train.log", "a", encoding="utf-8") as log:
    code = subprocess.call([sys.executable, "-m", "yanjax.train", f"--workdir={workdir}", *point.flags],
                           stdout=log, stderr=subprocess.STDOUT)
  val_loss = _final_val_loss(workdir / "metrics.jsonl")
  if code != 0 or val_loss is None or not math.isfinite(val_loss):
    print(f"[sweep] {point.id}: FAILED (exit code {code}, validation loss {val_loss}); see {workdir}/train.log",
          flush=True)
    return False
  record = {"id": point.id, "family": point.family, "size": point.size, "params": point.params,
            "active_params": point.active_params, "tokens": point.tokens, "flops": point.flops,
            "val_loss": val_loss, "flop_budget": point.flop_budget}
  result_file.write_text(json.dumps(record))
  print(f"[sweep] {point.id}: validation loss {val_loss:.4f}", flush=True)
  return True


def _final_val_loss(metrics: pathlib.Path) -> float | None:
  if not metrics.exists():
    return None
  losses = [json.loads(line)["val_loss"] for line in metrics.read_text().splitlines() if '"val_loss"' in line]
  return losses[-1] if losses else None


def collect(out: pathlib.Path) -> pathlib.Path:
  """Rebuilds <out>/results.jsonl from every finished point's result.json."""
  records = [p.read_text() for p in sorted((out / "points").glob("*/result.json"))]
  path = out / "results.jsonl"
  path.write_text("".join(r + "\n" for r in records))
  return path


def write_slurm_array(spec: pathlib.Path, out: pathlib.Path, count: int) -> pathlib.Path:
  """A SLURM job array, one task per point, each running `sweep run --only <index>`."""
  script = out / "sweep.sbatch"
  script.write_text(f"""#!/bin/bash
#SBATCH --job-name=yanjax-sweep
#SBATCH --array=0-{count - 1}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --output={out}/slurm-%A_%a.log
#SBATCH --requeue
# Submit: sbatch {script}     Then fit: python -m yanjax.sweep fit --out {out}
set -euo pipefail
cd {pathlib.Path.cwd()}
python -m yanjax.sweep run --spec {spec} --out {out} --only "$SLURM_ARRAY_TASK_ID"
""")
  return script


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  for name in ("run", "launch"):
    sub = commands.add_parser(name)
    sub.add_argument("--spec", required=True)
    sub.add_argument("--out", required=True)
    if name == "run":
      sub.add_argument("--only", type=int, default=None, help="run only the point of this index")
  fit = commands.add_parser("fit")
  fit.add_argument("--out", required=True)
  fit.add_argument("--grid", default="coarse", choices=("full", "coarse"))
  fit.add_argument("--bootstrap", type=int, default=100)
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)

  if args.command == "fit":
    from yanjax.scaling import fit as scaling_fit  # pylint: disable=import-outside-toplevel
    results = collect(out)
    scaling_fit.main(["--results", str(results), "--out", str(out / "fits"), "--grid", args.grid,
                      "--bootstrap", str(args.bootstrap)])
    return 0
  grid = points(load_spec(args.spec))
  if args.command == "launch":
    out.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_slurm_array(pathlib.Path(args.spec).resolve(), out.resolve(), len(grid))} "
          f"({len(grid)} points)")
    return 0
  chosen = grid if args.only is None else [grid[args.only]]
  failed = [p.id for p in chosen if not run_point(p, out)]
  results = collect(out)
  print(f"[sweep] {len(chosen) - len(failed)}/{len(chosen)} points finished; results in {results}"
        + (f"; failed: {failed}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
