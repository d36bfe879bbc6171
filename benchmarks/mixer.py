"""Forward + backward time of the MCSD block (each recurrence form) and the causal-attention block.

Same width, batch and dtype for both, in one run, on whatever backend JAX picks. Prints JSON lines: one per
(mixer, form or attention kernel, sequence length), then one ratio line per length and attention kernel (attention
time / each MCSD form's time). An attention line's `attention_kernel` is the implementation that ran ("cudnn" or
"xla", yanjax/model/attention_kernel.py) for the `requested` model.attention_kernel; `--attention_kernels xla,cudnn`
times both side by side on a GPU, each later line with `grad_rel_diff`, its gradients' max difference from the
first line's (`vs`) over their max.

Run: PYTHONPATH=. python3 benchmarks/mixer.py [--width 512 --channels 8 --heads 8 --batch 1 --dtype bfloat16]
     [--attention_kernels auto | xla,cudnn]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from yanjax.model import attention_kernel
from yanjax.model.attention import Attention
from yanjax.model.config import ModelConfig
from yanjax.model.layers import BlockInputs
from yanjax.model.mcsd import MCSD

FORMS = ("reference", "associative", "chunked")


def time_fwd_bwd(block, x, repeats: int):
  """(median seconds, gradients) of one jitted forward + backward (gradients of sum(y^2) w.r.t. parameters and
  input), one document per row."""
  graphdef, params = nnx.split(block)
  b, t = x.shape[:2]
  inputs = BlockInputs(jnp.zeros((b, t), bool), jnp.ones((b, t), jnp.int32),
                       jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), None)

  def loss(params, x):
    y, _ = nnx.merge(graphdef, params)(x, inputs)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(step(params, x))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    grads = jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2], grads


def relative_difference(grads, reference) -> float:
  """max |grads - reference| / max |reference| over the leaves of two gradient trees, in float32."""
  return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) /
                   jnp.max(jnp.abs(b.astype(jnp.float32))))
             for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--channels", type=int, default=8)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--chunk_size", type=int, default=64)
  parser.add_argument("--seq_lens", default="512,1024,2048,4096,8192")
  parser.add_argument("--forms", default=",".join(FORMS))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--attention_kernels", default="auto", help="model.attention_kernel values to time, "
                      f"comma-separated: {', '.join(attention_kernel.KERNELS)}")
  args = parser.parse_args(argv)

  base = ModelConfig(width=args.width, channels=args.channels, heads=args.heads, dtype=args.dtype,
                     chunk_size=args.chunk_size)
  device = jax.devices()[0]
  common = {"bench": "mixer", "backend": jax.default_backend(), "device": device.device_kind,
            "width": args.width, "channels": args.channels, "heads": args.heads, "batch": args.batch,
            "dtype": args.dtype}
  for seq_len in map(int, args.seq_lens.split(",")):
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, seq_len, args.width)).astype(args.dtype)
    timings = {}
    for form in args.forms.split(","):
      block = MCSD(base.replace(recurrence=form), rngs=nnx.Rngs(0))
      timings[form], _ = time_fwd_bwd(block, x, args.repeats)
      print(json.dumps({**common, "mixer": "mcsd", "form": form, "seq_len": seq_len,
                        "ms": round(timings[form] * 1e3, 3)}), flush=True)
    reference = None  # (kernel, gradients) of this length's first attention row
    for requested in args.attention_kernels.split(","):
      row = {**common, "mixer": "attention", "requested": requested, "seq_len": seq_len}
      try:
        cfg = base.replace(pattern=("attention",), attention_kernel=requested)
        row["attention_kernel"] = attention_kernel.for_run(cfg, seq_len)
        attention, grads = time_fwd_bwd(Attention(cfg, rngs=nnx.Rngs(0)), x, args.repeats)
      except Exception as error:  # pylint: disable=broad-except  # cuDNN refused here; out of memory at long lengths
        print(json.dumps({**row, "error": str(error)[:200]}), flush=True)
        continue
      if reference is None:
        reference = (row["attention_kernel"], grads)
      else:  # the same block's gradients by another implementation: how far cuDNN's are from XLA's
        row.update(grad_rel_diff=round(relative_difference(grads, reference[1]), 5), vs=reference[0])
      print(json.dumps({**row, "ms": round(attention * 1e3, 3)}), flush=True)
      print(json.dumps({**common, "ratio": "attention/mcsd", "requested": requested,
                        "attention_kernel": row["attention_kernel"], "seq_len": seq_len,
                        **{form: round(attention / t, 3) for form, t in timings.items()}}), flush=True)


if __name__ == "__main__":
  main()
