"""Batch-1 decode on CPU against the memory-bandwidth bound (issue #28, item 3): NumPy runtime, ONNX Runtime, JAX.

In one run: (1) this machine's memory bandwidth, measured with NumPy: a copy (`np.copyto`, bytes read +
written per second) and a read (`np.sum`, bytes read per second), each on one thread as NumPy runs it and on
all cores (one Python thread per core, each on its slice; both release the GIL), the best of `--repeats` over
arrays of `--mb` MB (the first size, by default 1 GiB per array, sets the bound; a second size near the
weights' shows what the caches give); (2) decode tokens/s at batch 1 (a `--prompt`-token prefill, then the
median of `--steps` timed greedy steps) of the NumPy runtime on the float32 export, of the NumPy runtime on
the int8 export (dequantized to float32 at load, so each token reads float32 weights as well), of ONNX Runtime
on the same exports' `--onnx` graphs (yanjax/export/onnx_session.py; the int8 graph's dequantization is folded
into float32 constants when the session loads), and of the JAX model's jitted `decode_step`; (3) the bytes one
decoded token reads (every weight the decode touches once, float32, plus the recurrent state read and written
and the logits written) and the bound each bandwidth figure implies, tokens/s = bandwidth / bytes per token,
with each runtime's fraction of it. The model has random
weights (`nnx.Rngs(0)`); speed does not depend on their values.

`--profile` adds cProfile's view of the float32 NumPy decode (Python-level calls per token, the functions that
take the time) and each matrix product of a step as one BLAS matmul (as the runtime does it) beside the same
product as np.einsum (as the runtime did before): what explains the distance to the bound.

JSON lines out: `bandwidth` (one per figure), `weights` (bytes per token), `decode` (one per runtime, with
`fraction_of_bound` per bandwidth figure), and with --profile `profile` and `op`.

Run: PYTHONPATH=. python3 benchmarks/edge_decode.py [--config configs/yan_20m.py] [--steps 32] [--prompt 16]
     [--mb 1024,80] [--repeats 5] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pathlib
import pstats
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from yanjax import numpy_runtime  # pylint: disable=wrong-import-position
from yanjax.core.config import load_config_file  # pylint: disable=wrong-import-position
from yanjax.export.onnx_session import OnnxModel  # pylint: disable=wrong-import-position
from yanjax.export.writer import export_model  # pylint: disable=wrong-import-position
from yanjax.model.config import ModelConfig  # pylint: disable=wrong-import-position
from yanjax.model.lm import LanguageModel  # pylint: disable=wrong-import-position

WARMUP = 2


def emit(row: dict) -> None:
  print(json.dumps(row), flush=True)


# ---- (1) memory bandwidth --------------------------------------------------------------------------------


def best_seconds(fn, repeats: int) -> float:
  fn()  # first touch / warm
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def bandwidth(mb: int, repeats: int, threads: int) -> list[dict]:
  """GB/s (1e9 bytes) of a float32 copy (read + written bytes), on 1 and on `threads` threads, and of a read."""
  n = mb * 2**20 // 4
  src = np.ones(n, np.float32)
  dst = np.zeros(n, np.float32)  # written once here, so the timed copies do not page-fault
  rows = []
  seconds = best_seconds(lambda: np.copyto(dst, src), repeats)
  rows.append({"figure": "copy", "threads": 1, "method": "np.copyto, bytes read + written",
               "gb_per_s": round(2 * src.nbytes / seconds / 1e9, 2)})
  bounds = np.linspace(0, n, threads + 1).astype(int)

  def on_slices(fn, *arrays):
    def run():
      workers = [threading.Thread(target=fn, args=[a[lo:hi] for a in arrays])
                 for lo, hi in zip(bounds[:-1], bounds[1:])]
      for worker in workers:
        worker.start()
      for worker in workers:
        worker.join()
    return run

  if threads > 1:
    seconds = best_seconds(on_slices(np.copyto, dst, src), repeats)
    rows.append({"figure": "copy", "threads": threads, "method": "np.copyto on slices, one Python thread each",
                 "gb_per_s": round(2 * src.nbytes / seconds / 1e9, 2)})
  seconds = best_seconds(lambda: np.sum(src), repeats)
  rows.append({"figure": "read", "threads": 1, "method": "np.sum, bytes read",
               "gb_per_s": round(src.nbytes / seconds / 1e9, 2)})
  if threads > 1:
    seconds = best_seconds(on_slices(np.sum, src), repeats)
    rows.append({"figure": "read", "threads": threads, "method": "np.sum on slices, one Python thread each",
                 "gb_per_s": round(src.nbytes / seconds / 1e9, 2)})
  for row in rows:
    row.update(bench="bandwidth", array_mb=mb, repeats=repeats)
  return rows


# ---- (3) bytes per token -----------------------------------------------------------------------------------


def bytes_per_token(runtime: numpy_runtime.Model, cfg: dict) -> dict:
  """What one batch-1 decode step reads and writes, in bytes: each weight it touches once (float32; the tied
  embedding once, as the head, its looked-up row inside it; a selective FFN's chosen top_k of its groups), the
  recurrent state read and written, the logits written. Activations between layers (a few D-vectors) are left
  out: they stay in cache."""
  weights = 0
  for name, a in runtime.w.items():
    fraction = cfg["top_k"] / cfg["groups"] if cfg["router"] and name.split(".")[-1] in ("gate_up", "down") else 1
    weights += int(a.nbytes * fraction)
  state = sum(a.nbytes for layer in runtime.init_state(1, 1).layers for a in layer if isinstance(a, np.ndarray))
  logits = cfg["vocab_size"] * 4
  return {"weight_bytes": weights, "state_bytes_read": state, "state_bytes_written": state,
          "logits_bytes_written": logits, "bytes_per_token": weights + 2 * state + logits}


# ---- (2) decode speed --------------------------------------------------------------------------------------


def time_steps(runtime: numpy_runtime.Model | OnnxModel, prompt: int, steps: int) -> list[float]:
  """Seconds of each timed greedy decode step (batch 1) of the NumPy runtime or an OnnxModel, after a
  `prompt`-token prefill and WARMUP steps."""
  state = runtime.init_state(1, max_len=prompt + WARMUP + steps + 1)
  logits, state = runtime.prefill(np.ones((1, prompt), np.int64), state)
  tokens = np.argmax(logits[:, -1], -1)
  times = []
  for i in range(WARMUP + steps):
    start = time.perf_counter()
    logits, state = runtime.decode_step(state, tokens)
    tokens = np.argmax(logits, -1)
    if i >= WARMUP:
      times.append(time.perf_counter() - start)
  return times


def time_jax(model: LanguageModel, prompt: int, steps: int) -> list[float]:
  """Seconds of each timed jitted `decode_step` + argmax (batch 1, cache donated) after a jitted prefill."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def prefill(params, tokens):
    m = nnx.merge(graphdef, params)
    logits, cache = m.prefill(tokens, m.init_cache(1))
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

  def step(params, cache, tokens):
    logits, cache = nnx.merge(graphdef, params).decode_step(cache, tokens)
    return jnp.argmax(logits, -1).astype(jnp.int32), cache

  step = jax.jit(step, donate_argnums=1)
  tokens, cache = prefill(params, jnp.ones((1, prompt), jnp.int32))
  times = []
  for i in range(WARMUP + steps):
    start = time.perf_counter()
    tokens, cache = step(params, cache, tokens)
    jax.block_until_ready(tokens)
    if i >= WARMUP:
      times.append(time.perf_counter() - start)
  return times


# ---- --profile: where the NumPy decode's time goes ---------------------------------------------------------


def profile_numpy(runtime: numpy_runtime.Model, prompt: int, steps: int) -> list[dict]:
  state = runtime.init_state(1, max_len=prompt + steps + 1)
  logits, state = runtime.prefill(np.ones((1, prompt), np.int64), state)
  tokens = np.argmax(logits[:, -1], -1)
  profiler = cProfile.Profile()
  profiler.enable()
  for _ in range(steps):
    logits, state = runtime.decode_step(state, tokens)
    tokens = np.argmax(logits, -1)
  profiler.disable()
  stats = pstats.Stats(profiler)
  rows = [{"bench": "profile", "what": "calls per token", "function_calls": round(stats.total_calls / steps),
           "primitive_calls": round(stats.prim_calls / steps),
           "ms_per_token_profiled": round(stats.total_tt / steps * 1e3, 3)}]
  top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:10]  # by own time
  for (file, line, name), (_, calls, own, _, _) in top:
    rows.append({"bench": "profile", "function": f"{pathlib.Path(file).name}:{line}:{name}",
                 "calls_per_token": round(calls / steps, 1), "own_ms_per_token": round(own / steps * 1e3, 3)})
  return rows


def op_times(runtime: numpy_runtime.Model, repeats: int) -> list[dict]:
  """Each matrix product of one decode step (layer 0's, and the tied head) as np.einsum (no `optimize`) beside the
  same product as one BLAS call (np.matmul on reshaped operands, as the runtime does it): median ms, and the
  weight bytes it reads per ms as GB/s."""
  w, c = runtime.w, runtime.cfg
  d, f = c["width"], c["mlp_width"]
  rows = []

  def add(name, weight, einsum, blas, count):
    assert np.allclose(einsum(), np.reshape(blas(), np.shape(einsum())), rtol=1e-4, atol=1e-4)
    for form, fn in (("einsum", einsum), ("BLAS matmul (the runtime)", blas)):
      seconds = float(np.median([best_seconds(fn, 1) for _ in range(repeats)]))
      rows.append({"bench": "op", "op": name, "form": form, "per_token": count, "weight_bytes": weight.nbytes,
                   "ms": round(seconds * 1e3, 4), "gb_per_s": round(weight.nbytes / seconds / 1e9, 2)})

  rng = np.random.default_rng(0)
  emb = w["embed.embedding"]  # [V, D]
  x = rng.standard_normal((1, 1, d), np.float32)
  add("head (tied): btd,dv->btv", emb, lambda: np.einsum("btd,dv->btv", x, emb.T), lambda: x[0] @ emb.T, 1)
  add("head (tied), as E @ x: btd,dv->btv", emb, lambda: np.einsum("btd,dv->btv", x, emb.T),
      lambda: emb @ x[0, 0], 1)
  layers = c["layers"]
  if "blocks.0.ffn.gate_up" in w and not c["router"]:
    gate_up, down = w["blocks.0.ffn.gate_up"], w["blocks.0.ffn.down"]  # [D, 2, F], [F, D]
    h = rng.standard_normal((1, 1, f), np.float32)
    add("ffn gate_up: ...d,dkf->...kf", gate_up, lambda: np.einsum("...d,dkf->...kf", x, gate_up),
        lambda: x[0] @ gate_up.reshape(d, -1), layers)
    add("ffn down: ...f,fd->...d", down, lambda: np.einsum("...f,fd->...d", h, down), lambda: h[0] @ down, layers)
  if "blocks.0.mixer.proj" in w:
    proj = w["blocks.0.mixer.proj"]  # [C, Dc, 4, Dc]
    ch, dc = proj.shape[:2]
    xc = rng.standard_normal((1, 1, ch, dc), np.float32)
    add("mcsd proj: btcd,cdke->btkce", proj, lambda: np.einsum("btcd,cdke->btkce", xc, proj),
        lambda: np.moveaxis(np.matmul(xc[0, 0][:, None, :], proj.reshape(ch, dc, -1)).reshape(ch, 4, dc), 1, 0),
        layers)
  if "blocks.0.mixer.out" in w and w["blocks.0.mixer.out"].ndim == 4:
    out = w["blocks.0.mixer.out"]  # [2, C, Dc, D]
    theta = rng.standard_normal((2, 1, 1) + out.shape[1:3], np.float32)
    add("mcsd out: kbtcd,kcde->bte", out, lambda: np.einsum("kbtcd,kcde->bte", theta, out),
        lambda: theta.reshape(1, -1) @ out.reshape(-1, d), layers)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(pathlib.Path(__file__).resolve().parents[1] / "configs/yan_20m.py"))
  parser.add_argument("--steps", type=int, default=32, help="timed decode steps per runtime (median reported)")
  parser.add_argument("--prompt", type=int, default=16, help="prefill length before the timed steps")
  parser.add_argument("--mb", default="1024,80", help="sizes of the bandwidth arrays, MB, comma-separated; the "
                      "bound uses the first (the others, e.g. about the weights' size, show what caches give)")
  parser.add_argument("--repeats", type=int, default=5, help="bandwidth repeats (best reported)")
  parser.add_argument("--profile", action="store_true", help="also profile the float32 NumPy decode")
  args = parser.parse_args(argv)

  threads = os.cpu_count() or 1
  common = {"machine_cores": threads, "numpy": np.__version__, "jax": jax.__version__}
  sizes = [int(mb) for mb in args.mb.split(",")]
  for mb in sizes:
    rows = bandwidth(mb, args.repeats, threads)
    for row in rows:
      emit({**row, **common, "sets_the_bound": mb == sizes[0]})
    if mb == sizes[0]:
      bandwidths = rows

  run = load_config_file(args.config)
  cfg = ModelConfig.from_dict(run["model"]).replace(dtype="float32")  # compute in float32, as the runtime does
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  runtimes = {}
  with tempfile.TemporaryDirectory() as tmp:
    for quantize in (None, "int8"):
      out = pathlib.Path(tmp) / (quantize or "float32")
      export_model(model, cfg, out, quantize=quantize, onnx=True)
      size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("weights"))
      onnx_size = (out / numpy_runtime.format.ONNX_DATA).stat().st_size
      runtimes[quantize or "float32"] = (numpy_runtime.Model(numpy_runtime.load_export(out)), size,
                                         OnnxModel(out), onnx_size)
  runtime = runtimes["float32"][0]
  traffic = bytes_per_token(runtime, runtime.cfg)
  common = {**common, "config": pathlib.Path(args.config).name, "batch": 1, "prompt": args.prompt,
            "steps": args.steps}
  bounds = {f"{b['figure']}_{b['threads']}t": round(b["gb_per_s"] * 1e9 / traffic["bytes_per_token"], 1)
            for b in bandwidths}
  emit({"bench": "weights", **common, "params": sum(a.size for a in runtime.w.values()), **traffic,
        "bound_tokens_per_s": bounds})

  measured = {
      "numpy_runtime_float32": (lambda: time_steps(runtime, args.prompt, args.steps),
                                f"weights file {runtimes['float32'][1]} bytes"),
      "numpy_runtime_int8": (lambda: time_steps(runtimes["int8"][0], args.prompt, args.steps),
                             f"weights file {runtimes['int8'][1]} bytes; dequantized to float32 at load, so each "
                             "token reads the float32 bytes"),
      "onnxruntime_float32": (lambda: time_steps(runtimes["float32"][2], args.prompt, args.steps),
                              f"onnxruntime {onnxruntime.__version__}, CPU, default threads; model.onnx.data "
                              f"{runtimes['float32'][3]} bytes"),
      "onnxruntime_int8": (lambda: time_steps(runtimes["int8"][2], args.prompt, args.steps),
                           f"model.onnx.data {runtimes['int8'][3]} bytes; the session folds the dequantization into "
                           "float32 constants, so each token reads the float32 bytes"),
      "jax_decode_step": (lambda: time_jax(model, args.prompt, args.steps),
                          f"jitted, {jax.default_backend()} ({jax.devices()[0].device_kind}), float32"),
  }
  for name, (fn, note) in measured.items():
    times = fn()
    seconds = float(np.median(times))
    tokens_per_s = 1 / seconds
    emit({"bench": "decode", **common, "runtime": name, "note": note, "ms_per_token": round(seconds * 1e3, 3),
          "ms_min": round(min(times) * 1e3, 3), "ms_max": round(max(times) * 1e3, 3),
          "tokens_per_s": round(tokens_per_s, 1),
          "effective_gb_per_s": round(traffic["bytes_per_token"] * tokens_per_s / 1e9, 2),
          "fraction_of_bound": {f"{b['figure']}_{b['threads']}t":
                                round(tokens_per_s * traffic["bytes_per_token"] / (b["gb_per_s"] * 1e9), 3)
                                for b in bandwidths}})
  if args.profile:
    for row in profile_numpy(runtime, args.prompt, min(args.steps, 16)) + op_times(runtime, 9):
      emit({**row, **common})


if __name__ == "__main__":
  main()
