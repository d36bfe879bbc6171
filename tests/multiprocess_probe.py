"""One process of the multi-process test (tests/test_distributed.py runs it under launch/local.py).

Joins the run with `yanjax.training.distributed.initialize_from_flags`, sums a global array whose shards live on
every process's devices, and writes what it saw to <out>/process_<i>.json; or, with --fail_process,
has that process raise.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils

from yanjax.training import distributed

_OUT = flags.DEFINE_string("out", None, "Directory for the result files.", required=True)
_FAIL_PROCESS = flags.DEFINE_integer(
    "fail_process", None, "This process raises right after joining (the others go on and wait).")


def main(argv):
  del argv
  topology = distributed.initialize_from_flags()
  assert distributed.initialize_from_flags() is topology  # a second call changes nothing
  if topology.process_index == _FAIL_PROCESS.value:
    raise RuntimeError(f"process {topology.process_index} fails on purpose")
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  # Process p contributes rows p * L + 1 ... (p + 1) * L, L = local device count: 1 .. D overall.
  first = jax.process_index() * jax.local_device_count() + 1
  local = np.arange(first, first + jax.local_device_count(), dtype=np.float32)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  global_array = jax.make_array_from_process_local_data(sharding, local)
  total = jax.jit(jnp.sum, out_shardings=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))(global_array)
  result = {
      "mode": topology.mode,
      "process_index": topology.process_index,
      "process_count": topology.process_count,
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "sum": float(total),
      "gathered_indices": multihost_utils.process_allgather(
          np.int32(jax.process_index())).tolist(),
  }
  with open(os.path.join(_OUT.value, f"process_{jax.process_index()}.json"), "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  app.run(main)
