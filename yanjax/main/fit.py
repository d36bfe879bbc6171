"""The `python -m yanjax.main.fit` command: fits scaling laws to sweep results and draws the frontier.

The work is the library yanjax.scaling.fit (its docstring states the laws and the output).
"""

from __future__ import annotations

import argparse
from typing import Sequence

from yanjax.core import cli
from yanjax.scaling import fit


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m yanjax.main.fit", description=fit.__doc__.split("\n\n")[0])
  parser.add_argument("--results", required=True, help="sweep results, JSONL or CSV (local or a bucket URL)")
  parser.add_argument("--out", required=True, help="directory for fit.json and the PNGs (local or a bucket URL)")
  parser.add_argument("--grid", choices=("full", "coarse"), default="full",
                      help="approach-3 starting points: Chinchilla's 4,500 or a coarse 243")
  parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples")
  parser.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
  parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  args = parser.parse_args(argv)
  try:
    fits = fit.fit_families(fit.load_results(args.results), args.grid, args.bootstrap, args.level, args.seed)
  except fit.FitError as e:
    raise fit.FitError(f"{args.results}: {e}; nothing written to {args.out}") from e
  fit.report(fits, fit.write_fits(fits, args.out))
  return 0


if __name__ == "__main__":
  cli.run(main)
