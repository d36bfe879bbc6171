"""Checkpoint save and restore time, local disk vs an S3 server, as a share of the train step, in one run.

For each config: the train state (parameters + AdamW moments) sharded fsdp=8 over 8 CPU devices, the median
train-step time, then for each storage (a local temporary directory; a moto S3 server started here on
127.0.0.1): the blocking part of an async save (what the loop waits for), the whole save, a restore onto the
same mesh, and a restore onto another layout (data=2 x fsdp=2 x tensor=2). Prints JSON lines.

Run: python benchmarks/checkpoint.py [--configs configs/yan_tiny.py,configs/yan_20m.py] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any backend starts

import numpy as np  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from yanjax import sharding  # pylint: disable=wrong-import-position
from yanjax.checkpointing import Checkpointer  # pylint: disable=wrong-import-position
from yanjax.config import load_config_file  # pylint: disable=wrong-import-position
from yanjax.model.lm import LanguageModel  # pylint: disable=wrong-import-position
from yanjax.optim import decay_mask, learning_rate_schedule, make_optimizer  # pylint: disable=wrong-import-position
from yanjax.run_config import validate_run_config  # pylint: disable=wrong-import-position
from yanjax.train import init_train_state, train_state_shardings  # pylint: disable=wrong-import-position
from yanjax.train_step import make_train_step  # pylint: disable=wrong-import-position

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import s3_server  # pylint: disable=wrong-import-position,import-error  # the tests' moto server helper

SAVE_MESH = {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
OTHER_MESH = {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}


def state_and_step(cfg, mesh_axes):
  """(train state, jitted step, batch, abstract state) of run config `cfg` on a mesh of `mesh_axes`."""
  cfg.mesh.update(mesh_axes)
  model_cfg = validate_run_config(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = {name: tuple(axes) for name, axes in cfg.rules}
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(0))))
  optimizer = make_optimizer(cfg.optimizer, cfg.train.steps, decay_mask(abstract))
  shardings = train_state_shardings(abstract, optimizer, rules, mesh)
  init = jax.jit(lambda: init_train_state(model_cfg, optimizer, 0), out_shardings=shardings)
  batch_shard = sharding.batch_sharding(mesh, rules)
  step = jax.jit(sharding.with_activation_rules(make_train_step(
      graphdef, optimizer, learning_rate_schedule(cfg.optimizer, cfg.train.steps), cfg.train.grad_accum,
      cfg.train.z_loss_weight), mesh, rules),
                 in_shardings=(shardings, batch_shard), out_shardings=(shardings, None))
  b, t = cfg.train.global_batch, cfg.train.seq_len
  tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (b, t + 1), dtype=np.int32)
  batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                          "segment_ids": np.ones((b, t), np.int32),
                          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
                          "loss_mask": np.ones((b, t), np.float32)}, batch_shard)
  return init(), step, batch, jax.eval_shape(init)


def median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_storage(workdir: str, state, abstract_same, abstract_other, repeats: int) -> dict[str, float]:
  """Milliseconds: save (blocking part and whole), restore onto the same and onto another mesh."""
  checkpointer = Checkpointer(workdir, keep=repeats + 1, async_save=True)
  blocking, whole = [], []
  for step in range(1, repeats + 1):
    start = time.perf_counter()
    checkpointer.save(step, state, {"step": step})
    blocking.append(time.perf_counter() - start)
    checkpointer.wait()
    whole.append(time.perf_counter() - start)
  checkpointer.close()

  def restore(abstract):
    restored = Checkpointer(workdir, async_save=False).restore_latest(abstract)
    jax.block_until_ready(restored[1])

  restore(abstract_same)  # warm-up: first tensorstore / s3 connections
  return {"save_blocking_ms": 1e3 * float(np.median(blocking)), "save_total_ms": 1e3 * float(np.median(whole)),
          "restore_ms": 1e3 * median_seconds(lambda: restore(abstract_same), repeats),
          "restore_other_mesh_ms": 1e3 * median_seconds(lambda: restore(abstract_other), repeats)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="configs/yan_tiny.py,configs/yan_20m.py")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  with s3_server.moto_server() as endpoint, tempfile.TemporaryDirectory() as local:
    s3_server.apply_environment(endpoint)
    bucket = s3_server.create_bucket(endpoint, "bench")
    for config in args.configs.split(","):
      cfg = load_config_file(config)
      state, step, batch, abstract_same = state_and_step(load_config_file(config), SAVE_MESH)
      _, _, _, abstract_other = state_and_step(load_config_file(config), OTHER_MESH)
      state, _ = step(state, batch)  # compile
      step_s = median_seconds(lambda: jax.block_until_ready(step(state, batch)), args.repeats)
      state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
      name = pathlib.Path(config).stem
      for storage_name, workdir in (("local", os.path.join(local, name)), ("s3", f"{bucket}/{name}")):
        result = measure_storage(workdir, state, abstract_same, abstract_other, args.repeats)
        print(json.dumps({
            "bench": "checkpoint", "config": name, "storage": storage_name, "state_bytes": state_bytes,
            "global_batch": cfg.train.global_batch, "seq_len": cfg.train.seq_len, "step_ms": round(1e3 * step_s, 1),
            **{k: round(v, 1) for k, v in result.items()},
            "save_blocking_per_step": round(result["save_blocking_ms"] / (1e3 * step_s), 3),
            "save_total_per_step": round(result["save_total_ms"] / (1e3 * step_s), 3),
            "other_mesh_over_same_mesh_restore": round(result["restore_other_mesh_ms"] / result["restore_ms"], 2),
            "devices": jax.device_count(), "backend": jax.default_backend()}), flush=True)


if __name__ == "__main__":
  main()
