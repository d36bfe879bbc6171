"""Prints every config in configs/ with its variants: total and active parameters, training FLOPs per token.

Run: python -m yanjax.main.config_table [--configs_dir configs] [--seq_len 4096]
"""

from __future__ import annotations

import argparse
import pathlib

from yanjax.core import cli
from yanjax.core.config import ConfigError, load_config_file
from yanjax.model.config import ModelConfig
from yanjax.model.counting import flops_per_token, param_count
from yanjax.training.presets import VARIANTS


def config_rows(configs_dir: pathlib.Path, seq_len: int):
  """Yields (config spec, ModelConfig, ParamCount, FLOPs per token) for every config file and variant."""
  paths = [path for path in sorted(configs_dir.glob("*.py")) if not path.name.startswith("_")]
  if not paths:
    raise ConfigError(f"--configs_dir {configs_dir}: no config files (*.py) there; give the configs/ directory")
  for path in paths:
    for variant in VARIANTS:
      spec = f"{path}:{variant}" if variant else str(path)
      cfg = ModelConfig.from_dict(load_config_file(spec).model)
      yield spec, cfg, param_count(cfg), flops_per_token(cfg, seq_len)


def main(argv=None):
  """The command; a missing --configs_dir or a broken config in it is a ConfigError: one line, exit 2."""
  parser = argparse.ArgumentParser(prog="python -m yanjax.main.config_table", description=__doc__.splitlines()[0])
  parser.add_argument("--configs_dir", default=str(pathlib.Path(__file__).resolve().parents[2] / "configs"))
  parser.add_argument("--seq_len", type=int, default=4096, help="sequence length for attention FLOPs")
  args = parser.parse_args(argv)
  rows = list(config_rows(pathlib.Path(args.configs_dir), args.seq_len))  # every config loads before any output
  header = f"{'config':<36} {'pattern':<16} {'router':<6} {'layers':>6} {'width':>6} {'total':>10} {'active':>10} " \
           f"{'GFLOPs/tok':>10}"
  print(header)
  print("-" * len(header))
  for spec, cfg, count, flops in rows:
    name = spec.split("configs/")[-1]
    print(f"{name:<36} {cfg.pattern_name:<16} {str(cfg.router):<6} {cfg.layers:>6} {cfg.width:>6} "
          f"{count.total / 1e6:>9.1f}M {count.active / 1e6:>9.1f}M {flops / 1e9:>10.3f}")
  print(f"\nFLOPs: training (forward + backward) per token at sequence {args.seq_len}; "
        "formula in yanjax/model/counting.py.")


if __name__ == "__main__":
  cli.run(main)
