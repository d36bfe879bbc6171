"""Loader throughput next to the tokens/s a training step consumes, as JSON lines on stdout.

  python benchmarks/data.py                       # stdlib store at data/stdlib (prepared if missing)
  python benchmarks/data.py --models yan_tiny --steps 10

For each model config the loader is timed at that model's (global batch, sequence length): `batch(step)`
in one thread, and `iterate()` with grain reader threads. The training step is a jitted optax.adamw
value_and_grad step of `yanjax.model.lm.LanguageModel` on the loader's batches. The last line per model
gives loader tokens/s over training tokens/s; the aim is >= 10.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import pathlib
import platform
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from yanjax.data.loader import make_loader  # pylint: disable=wrong-import-position
from yanjax.data.prepare import PrepareSettings, prepare_store  # pylint: disable=wrong-import-position
from yanjax.data.store import open_store  # pylint: disable=wrong-import-position

# (global batch, sequence length) each model is benchmarked at.
SHAPES = {"yan_tiny": (16, 256), "yan_85m": (8, 512)}
TARGET_RATIO = 10


def emit(record: dict):
  print(json.dumps(record), flush=True)


def loader_tokens_per_s(store: pathlib.Path, global_batch: int, seq_len: int, steps: int,
                        threads: int) -> float:
  """Tokens/s of `batch(step)` (threads=0) or of `iterate()` with `threads` grain reader threads."""
  loader = make_loader([store], seq_len=seq_len, global_batch=global_batch, seed=0)
  if threads:
    batches = iter(loader.iterate(0, num_threads=threads, prefetch_batches=2 * threads))
  else:
    batches = (loader.batch(step) for step in itertools.count())
  next(batches)  # epoch layout and in-memory read happen once, outside the timing
  start = time.perf_counter()
  for batch in itertools.islice(batches, steps):
    assert batch["inputs"].shape == (global_batch, seq_len)
  return steps * global_batch * seq_len / (time.perf_counter() - start)


def train_tokens_per_s(config_name: str, store: pathlib.Path, global_batch: int, seq_len: int,
                       steps: int) -> float:
  """Tokens/s of a jitted adamw training step of the config's model on the loader's batches."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from yanjax.core.config import load_config_file  # pylint: disable=import-outside-toplevel
  from yanjax.model.config import ModelConfig
  from yanjax.model.lm import LanguageModel  # pylint: disable=import-outside-toplevel

  cfg = ModelConfig.from_dict(load_config_file(REPO / "configs" / f"{config_name}.py").model)
  if open_store(store).vocab_size > cfg.vocab_size:
    raise ValueError(f"{store} has more token ids than {config_name}'s vocabulary {cfg.vocab_size}")
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    def loss_fn(model):
      logits, aux = model(batch["inputs"], segment_ids=batch["segment_ids"],
                          positions=batch["positions"])
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
      mask = batch["loss_mask"]
      return (losses * mask).sum() / mask.sum() + aux["aux_loss"]

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  loader = make_loader([store], seq_len=seq_len, global_batch=global_batch, seed=0)
  jax.block_until_ready(train_step(model, optimizer, loader.batch(0)))  # compile
  batches = [loader.batch(step) for step in range(1, steps + 1)]  # data time is not training time
  start = time.perf_counter()
  for batch in batches:
    loss = train_step(model, optimizer, batch)
  jax.block_until_ready(loss)
  return steps * global_batch * seq_len / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--store", default=str(REPO / "data" / "stdlib"),
                      help="prepared store; prepared from the Python stdlib (vocabulary 2048) if missing")
  parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  parser.add_argument("--loader_steps", type=int, default=200)
  parser.add_argument("--steps", type=int, default=5, help="timed training steps per model")
  parser.add_argument("--threads", type=int, default=2, help="grain reader threads for iterate()")
  args = parser.parse_args()

  store = pathlib.Path(args.store)
  with contextlib.redirect_stdout(sys.stderr):  # stdout carries only JSON lines
    prepare_store(PrepareSettings(output=str(store), vocab_size=2048))
  machine = {"machine": platform.machine(), "cpus": len(os.sched_getaffinity(0))}
  model_missing = importlib.util.find_spec("yanjax.model.lm") is None
  for name in args.models:
    global_batch, seq_len = SHAPES[name]
    shape = {"config": name, "global_batch": global_batch, "seq_len": seq_len, **machine}
    loader_rates = {}
    for mode, threads in (("batch", 0), ("iterate", args.threads)):
      loader_rates[mode] = loader_tokens_per_s(store, global_batch, seq_len, args.loader_steps, threads)
      emit({"benchmark": "loader", "mode": mode, "threads": threads,
            "tokens_per_s": round(loader_rates[mode]), **shape})
    if model_missing or not (REPO / "configs" / f"{name}.py").is_file():
      emit({"benchmark": "train_step", **shape, "skipped": "yanjax/model/lm.py or "
            f"configs/{name}.py does not exist yet; only the loader was measured"})
      continue
    train_rate = train_tokens_per_s(name, store, global_batch, seq_len, args.steps)
    emit({"benchmark": "train_step", "tokens_per_s": round(train_rate), **shape})
    ratio = loader_rates["batch"] / train_rate
    emit({"benchmark": "ratio", "loader_over_train": round(ratio, 1), "target": TARGET_RATIO,
          "meets_target": ratio >= TARGET_RATIO, **shape})


if __name__ == "__main__":
  main()
