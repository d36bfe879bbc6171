"""Train-step throughput: tokens/s and MFU of MCSD, its parameter-matched attention baseline and hybrid, same run.

The full jitted train step of yanjax.main.train (forward, backward, AdamW update) on random tokens, on all local
devices with the config's mesh. Prints JSON lines: one per (variant, sequence length), MCSD once per recurrence
form; then ratio lines per length: each row's tokens/s over attention's, and each other variant's (hybrid,
selective, mcsd_dd) over the first MCSD form's. The variants are MCSD (the config as written) and the config's
`:selective`, `:mcsd_dd`, `:attention` and `:hybrid` (yanjax/training/presets.py). The hybrid keeps the window its
config gives it (`:hybrid`: min(1024, the config's train.seq_len)), whatever --seq_lens, unless --window sets it.
`--set key=value` overrides a run-config key last (after the length's batch), e.g. `--set model.layers=2
--set mesh.tensor=1` to time a few layers of a paper size on one device. A row's `attention_kernel` is what ran its
attention layers' passes ("cudnn" or "xla", yanjax/model/attention_kernel.py; null without attention layers):
`--set model.attention_kernel=xla` times a GPU's attention without cuDNN.

Run: PYTHONPATH=. python3 benchmarks/train.py [--config configs/yan_tiny.py] [--seq_lens 512,2048,8192]
     [--tokens_per_step 16384] [--steps 5] [--recurrence auto,chunked,associative] [--window 256]
     [--variants mcsd,attention,hybrid] [--set model.layers=2 ...]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time

import jax
import numpy as np

from yanjax.core.config import load_config_file
from yanjax.model import attention_kernel
from yanjax.model.config import RECURRENCE_FORMS
from yanjax.model.counting import flops_per_token
from yanjax.training.metrics import mfu
from yanjax.training.presets import VARIANTS
from yanjax.training.run_config import validate_run_config
from yanjax.training.trainer import build_trainer


def build(cfg, devices=None):
  """(train state, jitted train step, a random batch, abstract state) of run config `cfg` on its mesh over
  `devices` (default: all): the trainer's own (yanjax/training/trainer.py)."""
  trainer = build_trainer(cfg, devices)
  b, t = cfg.train.global_batch, cfg.train.seq_len
  tokens = np.random.default_rng(0).integers(0, trainer.model_cfg.vocab_size, (b, t + 1), dtype=np.int32)
  batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                          "segment_ids": np.ones((b, t), np.int32),
                          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
                          "loss_mask": np.ones((b, t), np.float32)}, trainer.batch_sharding)
  return trainer.init(), trainer.train_step, batch, trainer.abstract_state()


def measure(cfg, steps: int) -> float:
  """Median seconds per train step of `cfg` (a run config) after one compile step."""
  state, step, batch, _ = build(cfg)
  return time_steps(state, step, batch, steps)


def time_steps(state, step, batch, steps: int) -> float:
  """Median seconds of `steps` calls of `step` (jitted or compiled), after one (warm-up, or compiling) call."""
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def named_choices(allowed: tuple[str, ...]):
  """An argparse type: comma-separated names, each in `allowed` -> the distinct names, in order."""
  def parse(text: str) -> list[str]:
    names = list(dict.fromkeys(text.split(",")))
    unknown = [name for name in names if name not in allowed]
    if unknown:
      raise argparse.ArgumentTypeError(f"{', '.join(map(repr, unknown))} not among {', '.join(allowed)}")
    return names
  return parse


recurrence_forms = named_choices(RECURRENCE_FORMS)  # MCSD recurrence forms
variant_names = named_choices(("mcsd", *filter(None, VARIANTS)))  # "mcsd" (the config as written) or a variant


def override(cfg, setting: str) -> None:
  """Sets `setting`, "key=value" (a dotted run-config key; the value a Python literal, else a string), in `cfg`,
  a locked run config; a ValueError naming the setting if the key is unknown or the value of another type."""
  key, equals, text = setting.partition("=")
  if not equals:
    raise ValueError(f"--set {setting}: expected KEY=VALUE, e.g. --set model.layers=2")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  *sections, name = key.split(".")
  node = cfg
  for depth, section in enumerate(sections):
    if not hasattr(node, "keys") or section not in node:
      raise ValueError(f"--set {setting}: the run config has no section {'.'.join(sections[:depth + 1])!r}")
    node = node[section]
  if not hasattr(node, "keys") or name not in node:
    known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
    raise ValueError(f"--set {setting}: {'.'.join(sections) or 'the run config'} has no key {name!r}; its keys: "
                     f"{known}")
  try:
    node[name] = value
  except TypeError as error:
    raise ValueError(f"--set {setting}: {error}") from None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/yan_tiny.py")
  parser.add_argument("--seq_lens", default="512,2048,8192")
  parser.add_argument("--tokens_per_step", type=int, default=16384, help="global batch = this / sequence length")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--dtype", default=None, help="override model.dtype (e.g. bfloat16)")
  parser.add_argument("--window", type=int, default=0, help="the hybrid's sliding window (0: its config's)")
  parser.add_argument("--recurrence", type=recurrence_forms, default=["auto"],
                      help="MCSD recurrence forms to time, comma-separated")
  parser.add_argument("--variants", type=variant_names, default=["mcsd", "attention", "hybrid"],
                      help="comma-separated: mcsd (once per --recurrence form), selective, mcsd_dd, attention, hybrid")
  parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                      help="override a run-config key of every variant, last (repeatable), e.g. model.layers=2")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  runs = [("", form) if variant == "mcsd" else (variant, None) for variant in args.variants
          for form in (args.recurrence if variant == "mcsd" else [None])]
  for seq_len in map(int, args.seq_lens.split(",")):
    throughput = {}
    for variant, form in runs:
      cfg = load_config_file(f"{args.config}:{variant}" if variant else args.config)
      if form:
        cfg.model.recurrence = form
      if variant == "hybrid" and args.window:
        cfg.model.window = args.window
      cfg.train.seq_len = seq_len
      cfg.train.global_batch = max(jax.device_count(), args.tokens_per_step // seq_len)
      cfg.model.max_decode_len = max(cfg.model.max_decode_len, seq_len)
      if args.dtype:
        cfg.model.dtype = args.dtype
      for setting in args.settings:
        override(cfg, setting)
      seconds = measure(cfg, args.steps)
      model_cfg = validate_run_config(cfg)
      tokens_per_s = cfg.train.global_batch * seq_len / seconds
      utilisation = mfu(flops_per_token(model_cfg, seq_len), tokens_per_s, jax.device_count(), device.device_kind)
      throughput[form or variant] = tokens_per_s
      print(json.dumps({"bench": "train_step", "config": args.config, "variant": variant or "mcsd",
                        "pattern": model_cfg.pattern_name, "recurrence": form, "seq_len": seq_len,
                        "window": model_cfg.window if "swa" in model_cfg.pattern else None,
                        "attention_kernel": attention_kernel.for_run(model_cfg, seq_len),
                        "global_batch": cfg.train.global_batch, "dtype": model_cfg.dtype,
                        "step_ms": round(seconds * 1e3, 2), "tokens_per_s": round(tokens_per_s, 1),
                        "mfu": "n/a" if utilisation is None else round(utilisation, 4),
                        "backend": jax.default_backend(), "device": device.device_kind,
                        "devices": jax.device_count(), "settings": args.settings}), flush=True)
    print_ratios(throughput, args.recurrence[0] if "mcsd" in args.variants else None, seq_len)


def print_ratios(throughput: dict[str, float], mcsd: str | None, seq_len: int) -> None:
  """Ratio lines of one length's tokens/s (`throughput`: by MCSD form or variant name): every row over attention,
  and each other variant over the MCSD form `mcsd` (None: no MCSD row)."""
  attention = throughput.pop("attention", None)
  if attention and throughput:
    print(json.dumps({"bench": "train_step", "ratio": "mcsd/attention tokens_per_s", "seq_len": seq_len,
                      **{name: round(value / attention, 3) for name, value in throughput.items()}}), flush=True)
  for variant in ("hybrid", "selective", "mcsd_dd"):
    if mcsd and variant in throughput:
      print(json.dumps({"bench": "train_step", "ratio": f"{variant}/mcsd tokens_per_s", "seq_len": seq_len,
                        variant: round(throughput[variant] / throughput[mcsd], 3)}), flush=True)


if __name__ == "__main__":
  try:
    main()
  except ValueError as error:  # ConfigError included: a setting the run config refuses, one line
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
