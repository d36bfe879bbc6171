"""Selective activation vs the dense FFN it sparsifies, at equal total parameters, in one run.

The full jitted train step of yanjax.train (forward, backward, AdamW; float32) of MaxText's tiny Llama shape
with the MCSD mixer: 4 layers, width 256 (4 channels), FFN 1024, vocabulary 8192. The selective variants split
the same FFN into 16 groups of 64 neurons and run the top 4 per token (plus a 64-wide router), with capacity
dispatch (factor 1.25) and dropless dispatch. Prints JSON lines: one per (variant, sequence length) with
tokens/s, microseconds per token and the step's compiled memory (XLA's memory analysis), a ratio line per
length, and FFN matmul FLOPs per token per layer for the GPU projection (grouped matmuls run only the chosen
groups' FLOPs; a dense-masked ragged_dot, as XLA's CPU backend runs it, runs all E groups).

Run: PYTHONPATH=. python3 benchmarks/selective.py [--seq_lens 512,2048,8192] [--tokens_per_step 16384]
     [--steps 3] [--variants dense,capacity,dropless]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from benchmarks.train import build
from yanjax.model.dispatch import group_capacity
from yanjax.presets import SELECTIVE_DEFAULTS, build_config

MODEL = dict(vocab_size=8192, width=256, layers=4, channels=4, mlp_width=1024)
VARIANTS = {
    "dense": {},
    "capacity": {**SELECTIVE_DEFAULTS, "dispatch": "capacity"},
    "dropless": {**SELECTIVE_DEFAULTS, "dispatch": "dropless"},
}


def run_config(variant: str, seq_len: int, batch: int):
  cfg = build_config(model={**MODEL, **VARIANTS[variant]}, variant=None,
                     train=dict(steps=100, global_batch=batch, seq_len=seq_len),
                     optimizer=dict(lr=1e-3, warmup_steps=10), data=dict(stores=("unused",)), mesh=dict(data=-1, fsdp=1, tensor=1, expert=1),
                     checkpoint=dict(every_steps=100))
  cfg.model.explore_steps = 0  # the router's own choice, as after its exploration phase
  return cfg


def ffn_flops_per_token(variant: str, seq_len: int) -> float:
  """Matmul FLOPs of one layer's FFN per token, forward: 2 * 3 * D * F for the groups a token runs."""
  d, f = MODEL["width"], MODEL["mlp_width"]
  if variant == "dense":
    return 6.0 * d * f
  e, k = SELECTIVE_DEFAULTS["groups"], SELECTIVE_DEFAULTS["top_k"]
  router = 2.0 * (d * 64 + 64 * e)
  if variant == "capacity":  # every one of the E x c slots runs, filled or not
    slots = e * group_capacity(seq_len, e, k, 1.25) / seq_len
  else:
    slots = k
  return router + slots * 6.0 * d * (f // e)


def measure(cfg, steps: int) -> tuple[float, int]:
  """(median seconds per step, compiled step memory in bytes: arguments + outputs + temporaries - aliased)."""
  state, step, batch, _ = build(cfg)
  memory = step.lower(state, batch).compile().memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
          - memory.alias_size_in_bytes)
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return float(np.median(times)), int(peak)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_lens", default="512,2048,8192")
  parser.add_argument("--tokens_per_step", type=int, default=16384, help="global batch = this / sequence length")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--variants", default="dense,capacity,dropless")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  variants = args.variants.split(",")
  for seq_len in map(int, args.seq_lens.split(",")):
    batch = max(jax.device_count(), args.tokens_per_step // seq_len)
    throughput = {}
    for variant in variants:
      seconds, peak = measure(run_config(variant, seq_len, batch), args.steps)
      throughput[variant] = batch * seq_len / seconds
      print(json.dumps({"bench": "selective", "variant": variant, "seq_len": seq_len, "global_batch": batch,
                        "step_ms": round(seconds * 1e3, 1), "tokens_per_s": round(throughput[variant], 1),
                        "us_per_token": round(seconds / (batch * seq_len) * 1e6, 2),
                        "step_memory_mib": round(peak / 2 ** 20, 1),
                        "ffn_mflops_per_token_layer": round(ffn_flops_per_token(variant, seq_len) / 1e6, 3),
                        "backend": jax.default_backend(), "device": device.device_kind}), flush=True)
    if "dense" in throughput:
      for variant in throughput.keys() - {"dense"}:
        print(json.dumps({"bench": "selective", "ratio": f"{variant}/dense tokens_per_s", "seq_len": seq_len,
                          "value": round(throughput[variant] / throughput["dense"], 3)}), flush=True)


if __name__ == "__main__":
  main()
