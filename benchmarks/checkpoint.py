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

from yanjax.core.config import load_config_file  # pylint: disable=wrong-import-position
from yanjax.training.checkpointing import Checkpointer  # pylint: disable=wrong-import-position

_REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_REPO / "tests"), str(_REPO / "benchmarks")]
import s3_server  # pylint: disable=wrong-import-position,import-error  # the tests' moto server helper
from train import build  # pylint: disable=wrong-import-position,import-error  # benchmarks/train.py's set-up

SAVE_MESH = {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
OTHER_MESH = {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}


def state_and_step(cfg, mesh_axes):
  """(train state, jitted step, batch, abstract state) of run config `cfg` on a mesh of `mesh_axes`."""
  cfg.mesh.update(mesh_axes)
  return build(cfg)


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
      times = []
      for _ in range(args.repeats + 1):  # the first call compiles; the step donates (so thread the state)
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
      step_s = float(np.median(times[1:]))
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
