"""Sequence parallelism: one train step at growing sequence lengths, time split over the devices, MCSD and attention.

For each variant (MCSD as the config writes it, its `:attention` baseline) and sequence length, the trainer's own
step (yanjax/training/trainer.py) on one sequence per step with time split over --sequence devices (mesh
sequence=S, nothing else split) and, for the same length, on one device: per-device memory from XLA's memory
analysis of the compiled step beside the plan's prediction (yanjax/training/plan.py), and tokens/s over --steps
steps. A length whose compiled step needs more than --capacity_gb per device is reported (plan and XLA) but not
run, and the lengths after it are not compiled (only planned): that is where the variant stops fitting.

On CPU the S devices are simulated (XLA_FLAGS=--xla_force_host_platform_device_count=8, set here when no flag is
given) and share the host's cores: tokens/s measures the work, not parallel speed-up. Prints JSON lines: one per
(variant, sequence ways, length).

Run: PYTHONPATH=. python3 benchmarks/sequence.py [--config configs/yan_tiny.py] [--variants mcsd,attention]
     [--seq_lens 4096,16384,65536] [--sequence 8] [--steps 2] [--capacity_gb 2.5] [--set model.layers=2 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()

import jax  # noqa: E402
from train import build, named_choices, override, time_steps  # noqa: E402  # pylint: disable=import-error

from yanjax.core.config import load_config_file  # noqa: E402
from yanjax.training.plan import make_plan  # noqa: E402

VARIANTS = {"mcsd": "", "attention": ":attention"}  # name -> the config variant (yanjax/training/presets.py)


def run_config(args, variant: str, seq_len: int, ways: int):
  """The run config of `variant` at `seq_len` with time over `ways` devices, one sequence per step."""
  cfg = load_config_file(args.config + VARIANTS[variant])
  cfg.train.seq_len, cfg.train.global_batch, cfg.train.grad_accum = seq_len, 1, 1
  cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1, sequence=ways)
  cfg.model.max_decode_len = max(cfg.model.max_decode_len, seq_len)  # attention's bound on its context
  for setting in args.set:
    override(cfg, setting)
  return cfg


def compiled_bytes(step, state, batch) -> tuple[object, int]:
  """(the compiled step, its bytes per device: arguments + outputs - aliased + temporaries)."""
  compiled = step.lower(state, batch).compile()
  m = compiled.memory_analysis()
  return compiled, m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def measure(args, variant: str, seq_len: int, ways: int, compile_it: bool) -> dict:
  """One JSON row; `compile_it` False: the plan only."""
  cfg = run_config(args, variant, seq_len, ways)
  plan = make_plan(cfg, ways, jax.devices()[0].device_kind, capacity_bytes=args.capacity_gb * 1e9)
  row = {"bench": "sequence_parallel", "config": args.config, "variant": variant, "sequence": ways,
         "seq_len": seq_len, "tokens_per_device": seq_len // ways, "plan_gb": round(plan.total_bytes / 1e9, 3)}
  if not compile_it:
    return row
  state, step, batch, _ = build(cfg, jax.devices()[:ways])
  compiled, total = compiled_bytes(step, state, batch)
  row.update(xla_gb=round(total / 1e9, 3), plan_over_xla=round(plan.total_bytes / total, 2),
             fits=total <= args.capacity_gb * 1e9)
  if row["fits"]:
    seconds = time_steps(state, compiled, batch, args.steps)
    row.update(step_s=round(seconds, 3), tokens_per_s=round(seq_len / seconds, 1))
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/yan_tiny.py")
  parser.add_argument("--variants", type=named_choices(tuple(VARIANTS)), default=list(VARIANTS))
  parser.add_argument("--seq_lens", default="4096,16384,65536")
  parser.add_argument("--sequence", type=int, default=8, help="devices each sequence's time is split over")
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--capacity_gb", type=float, default=2.5, help="memory per device a step may use")
  parser.add_argument("--set", action="append", default=[], help="KEY=VALUE run-config override (repeatable)")
  args = parser.parse_args(argv)
  lengths = [int(n) for n in args.seq_lens.split(",")]
  if jax.device_count() < args.sequence:
    raise ValueError(f"--sequence {args.sequence}: only {jax.device_count()} devices")
  for variant in args.variants:
    for ways in (1, args.sequence):
      fitting = True
      for seq_len in lengths:
        row = measure(args, variant, seq_len, ways, fitting)
        fitting = row.get("fits", False)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
  try:
    main()
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
