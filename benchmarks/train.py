"""Train-step throughput: tokens/s and MFU of MCSD, its parameter-matched attention baseline and hybrid, same run.

The full jitted train step of yanjax.main.train (forward, backward, AdamW update) on random tokens, on all local
devices with the config's mesh. Prints JSON lines: one per (MCSD recurrence form, attention or hybrid, sequence
length), then a ratio line per length (each MCSD form's and the hybrid's tokens/s over attention's, and the
hybrid's over the first MCSD form's). The hybrid keeps the window its config gives it (`:hybrid`: min(1024, the
config's train.seq_len)), whatever --seq_lens, unless --window sets it.

Run: PYTHONPATH=. python3 benchmarks/train.py [--config configs/yan_tiny.py] [--seq_lens 512,2048,8192]
     [--tokens_per_step 16384] [--steps 5] [--recurrence auto,chunked,associative] [--window 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from yanjax.core.config import load_config_file
from yanjax.model.config import RECURRENCE_FORMS
from yanjax.model.counting import flops_per_token
from yanjax.training.metrics import mfu
from yanjax.training.run_config import validate_run_config
from yanjax.training.trainer import build_trainer


def build(cfg):
  """(train state, jitted train step, a random batch, abstract state) of run config `cfg` on its mesh: the
  trainer's own (yanjax/training/trainer.py)."""
  trainer = build_trainer(cfg)
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
  """Median seconds of `steps` calls of the jitted `step`, after one (compiling) call."""
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def recurrence_forms(text: str) -> list[str]:
  """The distinct MCSD recurrence forms named in `text` (comma-separated), in order."""
  forms = list(dict.fromkeys(text.split(",")))
  unknown = [form for form in forms if form not in RECURRENCE_FORMS]
  if unknown:
    raise argparse.ArgumentTypeError(f"{', '.join(map(repr, unknown))} not among {', '.join(RECURRENCE_FORMS)}")
  return forms


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
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  runs = [("", form) for form in args.recurrence] + [("attention", None), ("hybrid", None)]
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
      seconds = measure(cfg, args.steps)
      model_cfg = validate_run_config(cfg)
      tokens_per_s = cfg.train.global_batch * seq_len / seconds
      utilisation = mfu(flops_per_token(model_cfg, seq_len), tokens_per_s, jax.device_count(), device.device_kind)
      throughput[form or variant] = tokens_per_s
      print(json.dumps({"bench": "train_step", "config": args.config, "pattern": model_cfg.pattern_name,
                        "recurrence": form, "seq_len": seq_len,
                        "window": model_cfg.window if "swa" in model_cfg.pattern else None,
                        "global_batch": cfg.train.global_batch, "dtype": model_cfg.dtype,
                        "step_ms": round(seconds * 1e3, 2), "tokens_per_s": round(tokens_per_s, 1),
                        "mfu": "n/a" if utilisation is None else round(utilisation, 4),
                        "backend": jax.default_backend(), "device": device.device_kind,
                        "devices": jax.device_count()}), flush=True)
    attention = throughput.pop("attention")
    print(json.dumps({"bench": "train_step", "ratio": "mcsd/attention tokens_per_s", "seq_len": seq_len,
                      **{form: round(value / attention, 3) for form, value in throughput.items()}}), flush=True)
    print(json.dumps({"bench": "train_step", "ratio": "hybrid/mcsd tokens_per_s", "seq_len": seq_len,
                      "hybrid": round(throughput["hybrid"] / throughput[args.recurrence[0]], 3)}), flush=True)


if __name__ == "__main__":
  try:
    main()
  except ValueError as error:  # ConfigError included: a setting the run config refuses, one line
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
