"""Selective activation vs the dense FFN it sparsifies, at equal total parameters, in one run.

The full jitted train step of yanjax.main.train (forward, backward, AdamW) on random tokens. The shape: by default
MaxText's tiny Llama shape with the MCSD mixer (4 layers, width 256 in 4 channels, FFN 1024, vocabulary 8192,
float32); with --config, that config file's model (e.g. configs/yan_1p6b.py: width 2560, FFN 13568, vocabulary
64000, bfloat16, remat save_dots), --layers of it. The selective variants split the same FFN into 16 groups and
run the top 4 per token (plus a 64-wide router; `yanjax.training.presets.SELECTIVE_DEFAULTS`), with
  capacity          capacity dispatch (factor 1.25)
  dropless          dropless dispatch, grouped matmuls by XLA (`model.grouped_matmul="xla"`: jax.lax.ragged_dot)
  dropless_tokamax  dropless dispatch, grouped matmuls by tokamax's kernels (`model.grouped_matmul="tokamax"`;
                    needs the `kernels` extra)
Prints JSON lines: one per (variant, sequence length) with tokens/s, microseconds per token, the step's compiled
memory (XLA's memory analysis), training FLOPs per token, the grouped-matmul implementation (`grouped_matmul`) and
the tokamax ops the compiled step runs (`tokamax_ops`, class names: PallasMosaicGpuRaggedDot, PallasTritonRaggedDot
and PallasMosaicTpuRaggedDot are its kernels, RaggedDot its fallback to XLA's ragged_dot) and, for tokamax, how far
its dropless FFN's output and gradients are from XLA's (`tokamax_vs_xla`, relative; `grouped_matmul_error`); then a
ratio line per length and variant with the FLOP ratio: the speed-up at dense-matmul efficiency. XLA evaluates
ragged_dot densely over all E groups on CPU (and, by its speed, on an H100), so there dropless does E times its FFN
FLOPs; on CPU tokamax runs XLA's ragged_dot too.

On an accelerator, at yan_1p6b's width (the selective variant's 16 groups of 848 neurons, top 4):
  PYTHONPATH=. python3 benchmarks/selective.py --config configs/yan_1p6b.py --layers 4 --seq_lens 4096 \
      --variants dense,capacity,dropless,dropless_tokamax

Run: PYTHONPATH=. python3 benchmarks/selective.py [--seq_lens 512,2048,8192] [--tokens_per_step 16384]
     [--steps 3] [--variants dense,capacity,dropless,dropless_tokamax] [--config configs/yan_1p6b.py --layers 4]
     [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from train import build, named_choices, time_steps  # pylint: disable=import-error  # benchmarks/train.py, beside this script

from yanjax.core.config import load_config_file
from yanjax.model.counting import flops_per_token
from yanjax.model.dispatch import dropless_dispatch, group_capacity
from yanjax.training.presets import SELECTIVE_DEFAULTS, build_config
from yanjax.training.run_config import validate_run_config

MODEL = dict(vocab_size=8192, width=256, layers=4, channels=4, mlp_width=1024)
VARIANTS = {
    "dense": {},
    "capacity": {**SELECTIVE_DEFAULTS, "dispatch": "capacity"},
    "dropless": {**SELECTIVE_DEFAULTS, "dispatch": "dropless", "grouped_matmul": "xla"},
    "dropless_tokamax": {**SELECTIVE_DEFAULTS, "dispatch": "dropless", "grouped_matmul": "tokamax"},
}


def base_model(config: str | None, layers: int, dtype: str | None) -> dict:
  """The dense model measured: MODEL, or the model of config file `config`; `layers` and `dtype` if given."""
  model = MODEL if config is None else dict(load_config_file(config).model)
  return {**model, **({"layers": layers} if layers else {}), **({"dtype": dtype} if dtype else {})}


def tokamax_ops(lowered_text: str) -> list[str]:
  """The tokamax ragged-dot ops in a lowered program's text (debug info on): tokamax names the scope of each call
  by its op, e.g. tokamax._src.ops.ragged_dot.pallas_mosaic_gpu.PallasMosaicGpuRaggedDot -> its class name."""
  return sorted(set(re.findall(r"tokamax\._src\.ops\.ragged_dot\.\w+\.(\w+)", lowered_text)))


def run_config(model: dict, variant: str, seq_len: int, batch: int):
  cfg = build_config(model={**model, **VARIANTS[variant]}, variant=None,
                     train=dict(steps=100, global_batch=batch, seq_len=seq_len),
                     optimizer=dict(lr=1e-3, warmup_steps=10), data=dict(stores=("unused",)),
                     mesh=dict(data=-1, fsdp=1, tensor=1, expert=1),
                     checkpoint=dict(every_steps=100))
  cfg.model.explore_steps = 0  # the router's own choice, as after its exploration phase
  return cfg


def train_flops_per_token(model: dict, variant: str, seq_len: int) -> float:
  """Training FLOPs per token (yanjax.model.counting: 6 x active parameters + mixing), counting for capacity
  dispatch every one of the E x C slots a row runs, filled or not (C ~ 1.25 t k / E, so ~1.25 k per token)."""
  model_cfg = validate_run_config(run_config(model, variant, seq_len, 1))
  flops = flops_per_token(model_cfg, seq_len)
  if model_cfg.router and model_cfg.dispatch == "capacity":
    e, k, g = model_cfg.groups, model_cfg.top_k, model_cfg.group_width
    slots = e * group_capacity(seq_len, e, k, model_cfg.capacity_factor) / seq_len
    flops += 6 * model_cfg.layers * 3 * model_cfg.width * g * (slots - k)
  return flops


def measure(cfg, steps: int) -> tuple[float, int, list[str]]:
  """(median seconds per step, compiled step memory in bytes: arguments + outputs + temporaries - aliased,
  the tokamax ops the step runs)."""
  state, step, batch, _ = build(cfg)
  lowered = step.lower(state, batch)
  compiled = lowered.compile()  # compiled once: timed below, not compiled again by the jitted step's first call
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
          - memory.alias_size_in_bytes)
  return time_steps(state, compiled, batch, steps), int(peak), tokamax_ops(lowered.as_text(debug_info=True))


def grouped_matmul_error(model_cfg, tokens: int) -> dict[str, float]:
  """How far tokamax's dropless FFN is from XLA's, on random routing of `tokens` tokens (a fifth of them padding)
  at the model's widths and dtype: max |tokamax - xla| / max |xla| of the output and of the gradients of a random
  projection of it w.r.t. the input and both weights. A kernel whose speed is recorded must also be right."""
  rng = np.random.default_rng(0)
  d, e, k, g = model_cfg.width, model_cfg.groups, model_cfg.top_k, model_cfg.group_width
  dtype = jnp.dtype(model_cfg.dtype)
  x = jnp.asarray(rng.standard_normal((1, tokens, d)), dtype)
  groups = jnp.asarray(np.argsort(rng.random((1, tokens, e)), axis=-1)[..., :k], jnp.int32)
  gates = jnp.asarray(rng.uniform(0.1, 1.0, (1, tokens, k)), jnp.float32)
  valid = jnp.asarray(np.arange(tokens)[None] < tokens * 4 // 5)
  gate_up = jnp.asarray(rng.standard_normal((e, d, 2, g)) * d ** -0.5, jnp.float32)
  down = jnp.asarray(rng.standard_normal((e, g, d)) * g ** -0.5, jnp.float32)
  weights = jnp.asarray(rng.standard_normal((1, tokens, d)), dtype)

  def run(grouped_matmul):
    def loss(x, gate_up, down, groups, gates, valid, weights):
      y, _ = dropless_dispatch(x, groups, gates, valid, gate_up, down, grouped_matmul)
      return jnp.sum((y * weights).astype(jnp.float32)), y
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, gate_up, down, groups, gates, valid, weights)

  (grads, y), (grads_ref, y_ref) = run("tokamax"), run("xla")
  errors = {}
  for name, a, b in zip(("output", "grad_x", "grad_gate_up", "grad_down"), (y, *grads), (y_ref, *grads_ref)):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    errors[name] = round(float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30)), 5)
  return errors


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_lens", default="512,2048,8192")
  parser.add_argument("--tokens_per_step", type=int, default=16384, help="global batch = this / sequence length")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--variants", type=named_choices(VARIANTS), default=["dense", "capacity", "dropless"],
                      help=f"comma-separated, of {', '.join(VARIANTS)}")
  parser.add_argument("--config", default=None, help="a config file whose model to measure (default: the tiny shape)")
  parser.add_argument("--layers", type=int, default=0, help="override model.layers (0: the model's)")
  parser.add_argument("--dtype", default=None, help="override model.dtype (e.g. bfloat16)")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  model = base_model(args.config, args.layers, args.dtype)
  for seq_len in map(int, args.seq_lens.split(",")):
    batch = max(jax.device_count(), args.tokens_per_step // seq_len)
    throughput = {}
    for variant in args.variants:
      cfg = run_config(model, variant, seq_len, batch)
      seconds, peak, ops = measure(cfg, args.steps)
      throughput[variant] = batch * seq_len / seconds
      dropless = cfg.model.router and cfg.model.dispatch == "dropless"
      tokamax = dropless and cfg.model.grouped_matmul == "tokamax"
      check = grouped_matmul_error(validate_run_config(cfg), min(batch * seq_len, 8192)) if tokamax else None
      print(json.dumps({"bench": "selective", "variant": variant, "seq_len": seq_len, "global_batch": batch,
                        "config": args.config or "tiny", "layers": cfg.model.layers, "width": cfg.model.width,
                        "mlp_width": cfg.model.mlp_width, "dtype": cfg.model.dtype,
                        "grouped_matmul": cfg.model.grouped_matmul if dropless else None, "tokamax_ops": ops,
                        "tokamax_vs_xla": check,
                        "step_ms": round(seconds * 1e3, 1), "tokens_per_s": round(throughput[variant], 1),
                        "us_per_token": round(seconds / (batch * seq_len) * 1e6, 2),
                        "step_memory_mib": round(peak / 2 ** 20, 1),
                        "train_mflops_per_token": round(train_flops_per_token(model, variant, seq_len) / 1e6, 3),
                        "backend": jax.default_backend(), "device": device.device_kind}), flush=True)
    if "dense" in throughput:
      for variant in [name for name in throughput if name != "dense"]:
        print(json.dumps({"bench": "selective", "ratio": f"{variant}/dense tokens_per_s", "seq_len": seq_len,
                          "value": round(throughput[variant] / throughput["dense"], 3),
                          "flops_ratio_dense_over_variant": round(train_flops_per_token(model, "dense", seq_len)
                                                                  / train_flops_per_token(model, variant, seq_len),
                                                                  3)}), flush=True)


if __name__ == "__main__":
  try:
    main()
  except ValueError as error:  # ConfigError included (e.g. dropless_tokamax without tokamax): one line
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
