"""Decode cost: per-token latency and decode-state bytes, MCSD vs its matched attention baseline, by context.

For each mixer, batch and context length it times one jitted `decode_step` (plus the greedy argmax that feeds
the next step) on a cache that already holds `context` tokens. The cache is filled cheaply instead of by a
prefill: MCSD's state is a fixed-size recurrence state whatever the context (its count is set to
context - 1), and the attention KV cache gets `context` filled slots (max_decode_len = context + the timed
steps, index = context - 1), so each timed step attends over ~context keys. `state_bytes` is the size of the
cache pytree holding exactly `context` tokens (all layers, all rows). Then the NumPy runtime's decode
tokens/s on an export of the same two models.

JSON lines out: one per (mixer, batch, context), one `flatness` line per (mixer, batch) (latency and state
at the longest context over the shortest), and one per NumPy-runtime measurement.

`--set key=value` overrides a key of the config before the models are built (e.g. `--set model.layers=2` for a
few layers of a paper size).

Run: PYTHONPATH=. python3 benchmarks/decode.py [--config configs/yan_tiny.py] [--contexts 512,2048,32768]
     [--batches 1,16] [--repeats 10] [--numpy_tokens 32] [--set model.layers=2 ...]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from train import override  # pylint: disable=import-error,wrong-import-position  # benchmarks/train.py, beside it

from yanjax import numpy_runtime  # pylint: disable=wrong-import-position
from yanjax.core.config import load_config_file  # pylint: disable=wrong-import-position
from yanjax.export.writer import export_model  # pylint: disable=wrong-import-position
from yanjax.model.attention import KVCache  # pylint: disable=wrong-import-position
from yanjax.model.config import ModelConfig
from yanjax.model.counting import param_count  # pylint: disable=wrong-import-position
from yanjax.model.lm import LanguageModel, ModelCache  # pylint: disable=wrong-import-position
from yanjax.training.presets import model_variant  # pylint: disable=wrong-import-position

WARMUP = 2


def state_bytes(cfg: ModelConfig, batch: int, context: int) -> int:
  """Bytes of the decode cache of a model that holds `context` tokens (KV slots = context)."""
  cfg = cfg.replace(max_decode_len=context)
  abstract = jax.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)).init_cache(batch))
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract))


def filled_cache(model: LanguageModel, batch: int, context: int) -> ModelCache:
  """A cache that has seen context - 1 tokens: counts / KV indices / positions set, states zero."""
  cache = model.init_cache(batch)
  seen = jnp.full((batch,), context - 1, jnp.int32)
  layers = [c._replace(index=seen) if isinstance(c, KVCache) else c._replace(count=seen) for c in cache.layers]
  return ModelCache(layers, seen)


def time_decode(cfg: ModelConfig, batch: int, context: int, repeats: int) -> float:
  """Median seconds of one jitted decode step (with greedy argmax) at `context`."""
  cfg = cfg.replace(max_decode_len=context + WARMUP + repeats)  # the KV slots of attention; MCSD has none
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  @jax.jit
  def make_cache():
    return filled_cache(nnx.merge(graphdef, params), batch, context)

  def step(params, cache, tokens):
    logits, cache = nnx.merge(graphdef, params).decode_step(cache, tokens)
    return jnp.argmax(logits, -1).astype(jnp.int32), cache

  step = jax.jit(step, donate_argnums=1)  # the cache is updated in place, as a server would
  cache = make_cache()
  tokens = jnp.zeros((batch,), jnp.int32)
  for _ in range(WARMUP):
    tokens, cache = step(params, cache, tokens)
  jax.block_until_ready(tokens)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    tokens, cache = step(params, cache, tokens)
    jax.block_until_ready(tokens)
    times.append(time.perf_counter() - start)
  del cache
  return float(np.median(times))


def numpy_tokens_per_s(cfg: ModelConfig, batch: int, new_tokens: int, prompt: int = 16) -> dict:
  """NumPy runtime on an export of `cfg`: prefill `prompt` tokens, then time `new_tokens` greedy steps."""
  with tempfile.TemporaryDirectory() as tmp:
    export_model(LanguageModel(cfg, rngs=nnx.Rngs(0)), cfg, tmp)
    runtime = numpy_runtime.Model(numpy_runtime.load_export(tmp))
  state = runtime.init_state(batch, max_len=prompt + new_tokens + 1)
  logits, state = runtime.prefill(np.ones((batch, prompt), np.int64), state)
  tokens = np.argmax(logits[:, -1], -1)
  start = time.perf_counter()
  for _ in range(new_tokens):
    logits, state = runtime.decode_step(state, tokens)
    tokens = np.argmax(logits, -1)
  seconds = time.perf_counter() - start
  return {"ms_per_step": round(seconds / new_tokens * 1e3, 3),
          "tokens_per_s": round(batch * new_tokens / seconds, 1)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(pathlib.Path(__file__).resolve().parents[1] / "configs/yan_tiny.py"))
  parser.add_argument("--contexts", default="512,1024,2048,4096,8192,16384,32768")
  parser.add_argument("--batches", default="1,16")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--numpy_tokens", type=int, default=32, help="0 skips the NumPy runtime")
  parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key before the models are built (repeatable), e.g. model.layers=2")
  args = parser.parse_args(argv)

  run = load_config_file(args.config)
  for setting in args.settings:
    override(run, setting)
  yan = ModelConfig.from_dict(run["model"]).replace(dtype=args.dtype)
  models = {family: model_variant(yan.to_dict(), variant, run.train.seq_len)
            for family, variant in (("mcsd", ""), ("attention", "attention"), ("hybrid", "hybrid"))}
  contexts = [int(c) for c in args.contexts.split(",")]
  batches = [int(b) for b in args.batches.split(",")]
  common = {"bench": "decode", "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "config": pathlib.Path(args.config).name, "dtype": args.dtype, "settings": args.settings}
  for mixer, cfg in models.items():
    params = param_count(cfg).total
    for batch in batches:
      rows = []
      for context in contexts:
        seconds = time_decode(cfg, batch, context, args.repeats)
        row = {**common, "mixer": mixer, "params": params, "batch": batch, "context": context,
               "ms_per_token": round(seconds * 1e3, 3), "tokens_per_s": round(batch / seconds, 1),
               "state_bytes": state_bytes(cfg, batch, context)}
        rows.append(row)
        print(json.dumps(row), flush=True)
      first, last = rows[0], rows[-1]
      print(json.dumps({**common, "mixer": mixer, "batch": batch, "flatness": True,
                        "contexts": [first["context"], last["context"]],
                        "latency_ratio": round(last["ms_per_token"] / first["ms_per_token"], 2),
                        "state_ratio": round(last["state_bytes"] / first["state_bytes"], 2)}), flush=True)
  if args.numpy_tokens:
    for mixer, cfg in models.items():
      for batch in batches:
        print(json.dumps({**common, "bench": "decode_numpy_runtime", "mixer": mixer, "batch": batch,
                          "new_tokens": args.numpy_tokens, **numpy_tokens_per_s(cfg, batch, args.numpy_tokens)}),
              flush=True)


if __name__ == "__main__":
  try:
    main()
  except ValueError as error:  # ConfigError included: a --set the config refuses, one line
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
