"""The `python -m yanjax.main.sweep` command.

Scaling-law sweeps: run a grid of model sizes x token budgets (or IsoFLOP budgets), collect, fit, plot.

The work is the library yanjax.scaling.sweep (usage in its docstring).
"""

from __future__ import annotations

import argparse

from etils import epath

from yanjax.core import cli, storage
from yanjax.core.cli import PREEMPTED_EXIT_CODE
from yanjax.core.config import ConfigError
from yanjax.scaling.sweep import (
  FAILED_EXIT_CODE,
  StopRequest,
  collect,
  fit_sweep,
  load_spec,
  points,
  run_point,
  write_slurm_array,
)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m yanjax.main.sweep", description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  out_help = "sweep directory: a local path, gs://bucket/... or s3://bucket/..."
  for name in ("run", "launch"):
    sub = commands.add_parser(name)
    sub.add_argument("--spec", required=True, help="sweep spec file (local or a bucket URL)")
    sub.add_argument("--out", required=True, help=out_help)
    if name == "run":
      sub.add_argument("--only", type=int, default=None, help="run only the point of this index")
    else:
      sub.add_argument("--script", default=None, help="where to write the (local) sbatch script; default "
                       "<out>/sweep.sbatch, or ./sweep.sbatch when --out is a bucket URL")
  fit = commands.add_parser("fit")
  fit.add_argument("--out", required=True, help=out_help)
  fit.add_argument("--grid", default="coarse", choices=("full", "coarse"))
  fit.add_argument("--bootstrap", type=int, default=100)
  args = parser.parse_args(argv)
  out = storage.as_path(args.out)
  if args.command == "fit":
    fit_sweep(out, args.grid, args.bootstrap)
    return 0
  storage.check_writable(out, "sweep --out", "give a directory (or bucket URL) this machine can write")
  spec = storage.as_path(args.spec)
  grid = points(load_spec(spec))
  if args.command == "launch":
    return _launch(args, spec, out, len(grid))
  if args.only is not None and not 0 <= args.only < len(grid):
    raise ConfigError(f"--only {args.only}: {spec} has {len(grid)} points; give an index in [0, {len(grid) - 1}]")
  chosen = grid if args.only is None else [grid[args.only]]
  done, failed, preempted = 0, [], False
  with StopRequest().installed() as stop:
    for point in chosen:
      if stop.signal is not None:
        preempted = True
        break
      code = run_point(point, out, stop)
      done += code == 0
      if code == FAILED_EXIT_CODE:
        failed.append(point.id)
      elif code != 0:
        preempted = True
        break
    results = collect(out)
  print(f"[sweep] {done}/{len(chosen)} points finished; results in {results}"
        + (f"; failed: {failed}" if failed else "") + ("; stopped by a signal" if preempted else ""))
  if preempted:
      return PREEMPTED_EXIT_CODE
  return FAILED_EXIT_CODE if failed else 0


def _launch(args: argparse.Namespace, spec: epath.Path, out: epath.Path, count: int) -> int:
  if args.script is not None:
    if storage.is_remote(args.script):
      raise ConfigError(f"--script {args.script}: sbatch reads a local file; give a local path")
    script = storage.as_path(args.script)
  elif storage.is_remote(out):
    script = storage.as_path("sweep.sbatch")
  else:
    script = out / "sweep.sbatch"
  write_slurm_array(spec, out, count, script)
  where = f" (--out {out} is a bucket, so the script and its logs are local)" if storage.is_remote(out) else ""
  print(f"wrote {script}{where}: {count} points; submit with `sbatch {script}`, "
        f"then `python -m yanjax.main.sweep fit --out {out}`")
  return 0


if __name__ == "__main__":
  cli.run(main)
