"""The `python -m yanjax.main.evaluate` command.

Evaluate a trained run (or an export) on lm-eval tasks and write the results JSON (docs/evaluation.md).

    python -m yanjax.main.evaluate --workdir runs/yan_tiny --tasks lambada_openai,hellaswag --limit 100
    python -m yanjax.main.evaluate --workdir runs/yan_tiny --tasks my_task.yaml      # a task YAML of your own
    python -m yanjax.main.evaluate --export exports/yan_tiny --tasks my_task --include_path my_tasks/ \
        --output results/yan_tiny.json

The work is the library yanjax.eval.harness (usage in its docstring); lm-eval is the `eval` extra.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from yanjax.core import cli, storage
from yanjax.core.errors import UserError
from yanjax.numpy_runtime.format import ExportError

COMMAND = "yanjax.main.evaluate"


def _parse(argv):
  parser = argparse.ArgumentParser(prog=f"python -m {COMMAND}", description=__doc__.splitlines()[2])
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument("--workdir", help="training run directory, local or gs:// / s3:// (latest checkpoint)")
  model.add_argument("--export", help="an export directory (docs/export.md), run by the NumPy runtime")
  parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names and/or task YAML files")
  parser.add_argument("--include_path", default=None, help="a directory of your own task YAML files")
  parser.add_argument("--output", default=None, help="the results JSON, local or gs:// / s3:// (default: "
                      "<workdir>/eval/<tasks>.json; required with --export)")
  parser.add_argument("--overwrite", action="store_true", help="replace an --output file this command did not "
                      "write (its own results files are replaced without it)")
  parser.add_argument("--mesh", default=None, help="mesh to restore onto, e.g. fsdp=4 (default: the run's "
                      "training mesh, or FSDP over all devices when it does not fit)")
  parser.add_argument("--batch_size", type=int, default=8, help="requests per batch")
  parser.add_argument("--window", type=int, default=1024, help="tokens per prefill: a longer request goes "
                      "through the model's cache in windows of this many tokens")
  parser.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
  parser.add_argument("--limit", type=float, default=None, help="documents per task: a count (>= 1) or a "
                      "fraction (< 1); for trying things, not for reporting")
  parser.add_argument("--bootstrap_iters", type=int, default=100000, help="resamples for the standard error of "
                      "metrics that are not means (0: none)")
  parser.add_argument("--log_samples", action="store_true", help="add every request and response to the JSON")
  parser.add_argument("--seed", type=int, default=0, help="few-shot sampling and generation seed")
  args = parser.parse_args(argv)
  args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  if not args.tasks:
    raise UserError("--tasks is empty: give comma-separated task names or task YAML files")
  for flag, value, low in (("batch_size", args.batch_size, 1), ("window", args.window, 1),
                           ("num_fewshot", args.num_fewshot, 0), ("bootstrap_iters", args.bootstrap_iters, 0)):
    if value is not None and value < low:
      raise UserError(f"--{flag}={value}: must be >= {low}")
  if args.limit is not None:
    if not args.limit > 0:
      raise UserError(f"--limit={args.limit}: must be a count >= 1 or a fraction in (0, 1)")
    if args.limit >= 1:
      if args.limit != int(args.limit):
        raise UserError(f"--limit={args.limit}: a count must be a whole number (or a fraction below 1)")
      args.limit = int(args.limit)
  if args.output is None:
    if args.export is not None:
      raise UserError("--output is required with --export (an export directory holds only the export's files)")
    names = [re.sub(r"\.ya?ml$", "", t.rstrip("/").rsplit("/", 1)[-1]) for t in args.tasks]
    args.output = str(storage.as_path(args.workdir) / "eval" / f"{'+'.join(names)}.json")
  return args


def check_replaceable(output, overwrite: bool) -> None:
  """Refuses an existing `output` that is not a results file of this command, unless `overwrite`."""
  path = storage.as_path(output)
  if overwrite or not storage.check_readable(path, "--output", "give a file path or URL these credentials may "
                                             "read and write"):
    return
  if path.is_dir():
    raise UserError(f"--output {output} is a directory: give the results file's path")
  try:
    ours = json.loads(path.read_text(encoding="utf-8")).get("yanjax", {}).get("command") == COMMAND
  except (ValueError, UnicodeDecodeError, AttributeError):
    ours = False
  if not ours:
    raise UserError(f"--output {output} exists and is not a results file of {COMMAND}, so it is not replaced; "
                    "give another --output, or --overwrite to replace it")


def main(argv=None) -> None:
  args = _parse(argv)
  check_replaceable(args.output, args.overwrite)
  from yanjax.eval import harness  # pylint: disable=import-outside-toplevel  # lm-eval loads in seconds
  harness.resolve_tasks(args.tasks, args.include_path)  # an unknown or broken task fails before loading a model
  options = dict(batch_size=args.batch_size, window=args.window, seed=args.seed)
  if args.workdir is not None:
    lm = harness.YanjaxLM.from_workdir(args.workdir, mesh=args.mesh, **options)
  else:
    lm = harness.YanjaxLM.from_export(args.export, **options)
  results = harness.evaluate(lm, args.tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                             limit=args.limit, bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples,
                             seed=args.seed)
  about = {"command": COMMAND, "workdir": args.workdir, "export": args.export, "tasks": args.tasks,
           "include_path": args.include_path, "num_fewshot": args.num_fewshot, "limit": args.limit,
           "batch_size": args.batch_size, "window": args.window, "seed": args.seed,
           "pattern": list(lm.backend.pattern)}
  output = storage.as_path(args.output)
  if not storage.is_remote(output):
    output.parent.mkdir(parents=True, exist_ok=True)
  storage.write_atomic(output, harness.results_json(results, about))
  from lm_eval.utils import make_table  # pylint: disable=import-outside-toplevel
  print(make_table(results))
  print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main, (ExportError,))
