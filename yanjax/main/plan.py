"""The `python -m yanjax.main.plan` command.

The plan of a run before its launch: mesh, per-device memory, tokens, steps, FLOPs and step time.

The work is the library yanjax.training.plan (usage in its docstring).
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

import jax

from yanjax.core import cli
from yanjax.core.config import ConfigError, config_flag_error, config_spec
from yanjax.training.plan import (
  DEFAULT_MFU,
  HEADROOM,
  KNOBS,
  Plan,
  compiled_memory,
  fitting_change,
  gigabytes,
  make_plan,
)


def format_plan(plan: Plan, compiled: dict[str, int] | None = None, compiled_note: str = "", to_fit: str = "") -> str:
  """The plan as a readable table."""
  cap = plan.capacity_bytes
  peak = f"{plan.peak_flops / 1e12:,.0f} TFLOP/s bf16 peak" if plan.peak_flops else "peak FLOP/s unknown"
  lines = [f"plan: {plan.config or 'config'} on {plan.devices} x {plan.device_kind} "
           f"({gigabytes(cap) if cap else 'memory unknown'}, {peak})",
           f"  mesh                    {' '.join(f'{k}={v}' for k, v in plan.mesh.items())}; batch over "
           f"{plan.batch_ways} devices" + (f", time over {plan.length_ways}" if plan.length_ways > 1 else "") +
           f": {plan.micro_batch_per_device} x {plan.segment_len} tokens per device per micro-batch (grad_accum "
           f"{plan.grad_accum})",
           f"  parameters              {plan.params_total:,} ({gigabytes(4 * plan.params_total)} float32 in all)",
           "  memory per device",
           f"    parameters (float32)            {gigabytes(plan.param_bytes):>12}",
           f"    optimizer state (AdamW m, v)    {gigabytes(plan.optimizer_bytes):>12}",
           f"    batch                           {gigabytes(plan.batch_bytes):>12}",
           f"    gradients (backward)            {gigabytes(plan.gradient_bytes):>12}",
           f"    gathered weights (FSDP, casts)  {gigabytes(plan.gathered_bytes):>12}",
           f"    activations saved, remat={plan.remat:<9} {gigabytes(plan.saved_bytes):>9}  ({plan.dtype})",
           f"    backward working set            {gigabytes(plan.working_bytes):>12}" +
           (f"  (attention on {plan.attention_kernel})" if plan.attention_kernel else ""),
           f"    {f'logits, loss chunk of {plan.loss_chunk}':<32}{gigabytes(plan.logits_bytes):>12}",
           f"    update phase (3 M)              {gigabytes(plan.update_bytes):>12}",
           f"    total (state + max of phases)   {gigabytes(plan.total_bytes):>12}" +
           (f"  = {plan.total_bytes / cap:.0%} of {gigabytes(cap)}: " +
            ("fits" if plan.fits else f"DOES NOT FIT (limit {HEADROOM:.0%}); turn {', '.join(KNOBS)}")
            if cap else "  (capacity unknown: no check)")]
  if compiled is not None:
    lines.append(f"    compiled step (XLA)             {gigabytes(compiled['total']):>12}  (argument "
                 f"{gigabytes(compiled['argument'])}, temp {gigabytes(compiled['temp'])}; plan / compiled = "
                 f"{plan.total_bytes / compiled['total']:.2f})")
  elif compiled_note:
    lines.append(f"    compiled step (XLA)             {compiled_note}")
  if to_fit:
    lines.append(f"    to fit                          {to_fit}")
  step = plan.step_time_s
  timing = (f"{step:.3f} s at MFU {plan.mfu:.2f}; the run {plan.steps * step / 3600:,.1f} h" if step else
            "n/a (no peak FLOP/s for this device kind)")
  lines += [f"  tokens per step         {plan.tokens_per_step:,}",
            f"  steps                   {plan.steps:,}  ({plan.steps * plan.tokens_per_step:,} tokens)",
            f"  FLOPs per step          {plan.flops_per_step:.3e}  (yanjax/model/counting.py, model FLOPs)",
            f"  expected step time      {timing}"]
  return "\n".join(lines)


def _check_flags(values) -> None:
  """Refuses --devices and --mfu values no run has, before anything is planned."""
  if values.devices is not None and values.devices < 1:
    raise ConfigError(f"--devices={values.devices}: must be >= 1 (leave it out to plan for the local devices)")
  if not 0 < values.mfu <= 1:
    raise ConfigError(f"--mfu={values.mfu}: must be in (0, 1], the fraction of peak FLOP/s a step reaches "
                      f"(default {DEFAULT_MFU})")


def main(argv: Sequence[str] | None = None) -> int:
  """The `python -m yanjax.main.plan` command; returns the exit code (2: a user error, one line)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv if argv is None else argv)
  values = flags.FlagValues()  # not absl's global FLAGS: yanjax.main.train defines --config there
  config_flags.DEFINE_config_file("config", None, "Python config file (path[:variant]).", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_integer("devices", None, "Devices of the run (default: the local devices).", flag_values=values)
  flags.DEFINE_string("device_kind", None, "Device kind, e.g. 'H100 80GB', 'TPU v5p' (default: the local one).",
                      flag_values=values)
  flags.DEFINE_float("mfu", DEFAULT_MFU, "Model FLOPs utilisation for the expected step time.", flag_values=values)
  flags.DEFINE_bool("json", False, "Print one JSON line instead of the table.", flag_values=values)
  flags.DEFINE_bool("compile", False, "Also compile the sharded step on the local devices (needs exactly "
                    "--devices of them) and print XLA's memory analysis.", flag_values=values)
  flags.DEFINE_integer("local_device_count", None, "CPU: expose this many devices (for --compile).",
                       flag_values=values)
  if cli.wants_help(argv):
    print(f"{__doc__}\nflags:\n{values.get_help(include_special_flags=False)}", flush=True)
    return 0
  if not config_spec(argv):
    print("error: --config is required, e.g. --config configs/yan_1p6b.py", file=sys.stderr, flush=True)
    return 2
  try:
    values(argv)
    values.config.keys()  # config_flags defers a config file's load error to the first access
  except Exception as error:  # pylint: disable=broad-except  # config_flags raises whatever the override hit
    print(f"error: {config_flag_error(argv, error)}", file=sys.stderr, flush=True)
    return 2
  try:
    _check_flags(values)
    if values.local_device_count:
      jax.config.update("jax_num_cpu_devices", values.local_device_count)
    devices = values.devices or jax.device_count()
    kind = values.device_kind or jax.devices()[0].device_kind
    plan = make_plan(values.config, devices, kind, values.mfu, config_spec(argv))
    to_fit = fitting_change(values.config, devices, kind, plan.capacity_bytes) if plan.fits is False else ""
    compiled, note = None, ""
    if values.compile:
      if devices == jax.device_count():
        compiled = compiled_memory(values.config)
      else:
        note = f"not compiled: {jax.device_count()} local devices, not {devices}"
  except ConfigError as error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    return 2
  if values.json:
    print(json.dumps({**plan.to_dict(), "to_fit": to_fit, "compiled": compiled}), flush=True)
  else:
    print(format_plan(plan, compiled, note, to_fit), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
