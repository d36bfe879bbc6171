"""Selective activation vs the dense FFN it sparsifies, at equal total parameters, in one run.

The full jitted train step of yanjax.main.train (forward, backward, AdamW; float32) of MaxText's tiny Llama shape
with the MCSD mixer: 4 layers, width 256 (4 channels), FFN 1024, vocabulary 8192. The selective variants split
the same FFN into 16 groups of 64 neurons and run the top 4 per token (plus a 64-wide router), with capacity
dispatch (factor 1.25) and dropless dispatch. Prints JSON lines: one per (variant, sequence length) with
tokens/s, microseconds per token, the step's compiled memory (XLA's memory analysis) and training FLOPs per
token, and a ratio line per length with the FLOP ratio: the speed-up a GPU with grouped matmuls (megablox,
ragged_dot kernels) at dense-matmul efficiency would give. XLA's CPU backend runs ragged_dot densely over all
E groups, so dropless on CPU does E / k times its FLOPs in the FFN.

Run: PYTHONPATH=. python3 benchmarks/selective.py [--seq_lens 512,2048,8192] [--tokens_per_step 16384]
     [--steps 3] [--variants dense,capacity,dropless]
"""

from __future__ import annotations

import argparse
import json

import jax
from train import build, time_steps  # pylint: disable=import-error  # benchmarks/train.py, beside this script

from yanjax.model.counting import flops_per_token
from yanjax.model.dispatch import group_capacity
from yanjax.training.presets import SELECTIVE_DEFAULTS, build_config
from yanjax.training.run_config import validate_run_config

MODEL = dict(vocab_size=8192, width=256, layers=4, channels=4, mlp_width=1024)
VARIANTS = {
    "dense": {},
    "capacity": {**SELECTIVE_DEFAULTS, "dispatch": "capacity"},
    "dropless": {**SELECTIVE_DEFAULTS, "dispatch": "dropless"},
}


def run_config(variant: str, seq_len: int, batch: int):
  cfg = build_config(model={**MODEL, **VARIANTS[variant]}, variant=None,
                     train=dict(steps=100, global_batch=batch, seq_len=seq_len),
                     optimizer=dict(lr=1e-3, warmup_steps=10), data=dict(stores=("unused",)),
                     mesh=dict(data=-1, fsdp=1, tensor=1, expert=1),
                     checkpoint=dict(every_steps=100))
  cfg.model.explore_steps = 0  # the router's own choice, as after its exploration phase
  return cfg


def train_flops_per_token(variant: str, seq_len: int) -> float:
  """Training FLOPs per token (yanjax.model.counting: 6 x active parameters + mixing), counting for capacity
  dispatch every one of the E x C slots a row runs, filled or not (C ~ 1.25 t k / E, so ~1.25 k per token)."""
  model_cfg = validate_run_config(run_config(variant, seq_len, 1))
  flops = flops_per_token(model_cfg, seq_len)
  if variant == "capacity":
    e, k, g = model_cfg.groups, model_cfg.top_k, model_cfg.group_width
    slots = e * group_capacity(seq_len, e, k, model_cfg.capacity_factor) / seq_len
    flops += 6 * model_cfg.layers * 3 * model_cfg.width * g * (slots - k)
  return flops


def measure(cfg, steps: int) -> tuple[float, int]:
  """(median seconds per step, compiled step memory in bytes: arguments + outputs + temporaries - aliased)."""
  state, step, batch, _ = build(cfg)
  memory = step.lower(state, batch).compile().memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
          - memory.alias_size_in_bytes)
  return time_steps(state, step, batch, steps), int(peak)


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
                        "train_mflops_per_token": round(train_flops_per_token(variant, seq_len) / 1e6, 3),
                        "backend": jax.default_backend(), "device": device.device_kind}), flush=True)
    if "dense" in throughput:
      for variant in throughput.keys() - {"dense"}:
        print(json.dumps({"bench": "selective", "ratio": f"{variant}/dense tokens_per_s", "seq_len": seq_len,
                          "value": round(throughput[variant] / throughput["dense"], 3),
                          "flops_ratio_dense_over_variant": round(train_flops_per_token("dense", seq_len)
                                                                  / train_flops_per_token(variant, seq_len), 3)}),
              flush=True)


if __name__ == "__main__":
  main()
