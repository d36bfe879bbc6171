"""Mesh from the config, logical-axis rules held as data, and the placement of parameters and batches.

A parameter's logical names (its `out_sharding` metadata, e.g. ("embed", "mlp")) map through the rules table
to mesh axes; a mesh axis that does not divide the dimension, or is already used by an earlier dimension, is
dropped (that dimension is replicated over it), and the start-up report says how many bytes stay replicated.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from yanjax.core.config import ConfigError
from yanjax.model.partitioning import activation_sharding
from yanjax.training.run_config import MESH_AXES


def mesh_shape(mesh_cfg: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Axis sizes in MESH_AXES order (an axis `mesh_cfg` does not name: 1), with -1 filled; raises ConfigError if
  they do not match the devices."""
  sizes = [mesh_cfg.get(a, 1) for a in MESH_AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError(f"mesh {dict(mesh_cfg)}: the fixed axes ({fixed} devices) do not divide the "
                        f"{num_devices} devices; change mesh.* so their product divides {num_devices}")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh {dict(mesh_cfg)} needs {math.prod(sizes)} devices but {num_devices} are "
                      f"present; set one axis to -1 or make the product {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: XLA's sharding propagation places activations; parameters and batches are placed explicitly.
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], rules: dict[str, Sequence[str]],
                    mesh: Mesh) -> PartitionSpec:
  """PartitionSpec of an array of `shape` whose dimensions carry logical `axes`; a tuple of logical names marks a
  dimension that merges several (("length", "batch"): segments of sequences, yanjax.model.partitioning), split
  over their mesh axes in that order."""
  used: set[str] = set()
  spec = []
  for name, size in zip(axes, shape):
    chosen = []
    names = name if isinstance(name, tuple) else (name,) if name else ()
    for axis in (axis for logical in names for axis in rules.get(logical, ())):
      if axis not in used and mesh.shape[axis] > 1 and size % (math.prod(mesh.shape[a] for a in chosen)
                                                                 * mesh.shape[axis]) == 0:
        chosen.append(axis)
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return PartitionSpec(*spec)


def state_shardings(state: nnx.State, rules: dict[str, Sequence[str]], mesh: Mesh) -> Any:
  """NamedShardings for every array of an NNX state, from each variable's logical axes."""
  def one(var):
    axes = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return NamedSharding(mesh, logical_to_spec(axes, var.shape, rules, mesh))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_activation_rules(fn, mesh: Mesh, rules: dict[str, Sequence[str]]):
  """`fn` tracing under the activation constraints of `rules` (the model's `constrain` calls)."""
  def to_spec(axes, shape):
    return logical_to_spec(axes, shape, rules, mesh)

  def traced(*args):
    with activation_sharding(mesh, to_spec):
      return fn(*args)

  return traced


def batch_sharding(mesh: Mesh, rules: dict[str, Sequence[str]]) -> NamedSharding:
  """Sharding of [batch, length] arrays: batch and length over their rules' mesh axes."""
  def axes(name):
    return tuple(a for a in rules.get(name, ()) if mesh.shape[a] > 1) or None
  return NamedSharding(mesh, PartitionSpec(axes("batch"), axes("length")))


def axis_ways(mesh: Mesh | jax.sharding.AbstractMesh, rules: dict[str, Sequence[str]], logical: str) -> int:
  """Devices a dimension of logical axis `logical` is split over at most: its rule's mesh axes' sizes' product."""
  return math.prod(mesh.shape[a] for a in rules.get(logical, ()))


def check_batch_divides(global_batch: int, grad_accum: int, seq_len: int, mesh: Mesh,
                        rules: dict[str, Sequence[str]]):
  """ConfigError unless every micro-batch splits evenly over the batch mesh axes and every sequence over the
  length (sequence-parallel) ones."""
  ways = axis_ways(mesh, rules, "batch")
  if (global_batch // grad_accum) % ways:
    raise ConfigError(f"train.global_batch={global_batch} (/ grad_accum {grad_accum}) does not divide over "
                      f"the {ways} devices of the batch mesh axes {tuple(rules.get('batch', ()))}; use a "
                      f"multiple of {ways * grad_accum}")
  ways = axis_ways(mesh, rules, "length")
  if seq_len % ways:
    raise ConfigError(f"train.seq_len={seq_len} does not divide over the {ways} devices of the length mesh axes "
                      f"{tuple(rules.get('length', ()))}; use a multiple of {ways} or change mesh.sequence")


def replication_report(abstract: Any, shardings: Any) -> dict[str, float]:
  """Bytes of parameters per device vs total: how much of the model each device holds."""
  total = per_device = replicated = 0
  for arr, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    nbytes = int(np.prod(arr.shape)) * np.dtype(arr.dtype).itemsize
    shard = int(np.prod(sharding.shard_shape(arr.shape))) * np.dtype(arr.dtype).itemsize
    total += nbytes
    per_device += shard
    if shard == nbytes:
      replicated += nbytes
  return {"param_bytes": total, "param_bytes_per_device": per_device, "fully_replicated_bytes": replicated,
          "fraction_per_device": per_device / max(total, 1)}


def process_rows(batch: NamedSharding, global_batch: int, seq_len: int) -> tuple[int, int]:
  """(i, n): this process's devices hold block i of the n blocks of B / n rows of every [B, T] batch placed by
  `batch`. Processes that split the same rows' time between them (sequence parallelism across hosts) hold the
  same block, and each of them loads those whole rows (`global_batch_array` gives each device its positions)."""
  rows = {(index[0].start or 0, index[0].stop or global_batch)
          for index in batch.addressable_devices_indices_map((global_batch, seq_len)).values()}
  first, stop = min(start for start, _ in rows), max(end for _, end in rows)
  size = stop - first
  covered = sum(end - start for start, end in rows) == size  # the devices' row slices tile [first, stop)
  if not covered or global_batch % size or first % size:
    raise ConfigError(f"this process's devices hold rows {sorted(rows)} of each batch of {global_batch}: not one "
                      "block of whole rows; order the mesh so that each process's devices share rows")
  return first // size, global_batch // size


def global_batch_array(local: dict[str, np.ndarray], sharding: NamedSharding, global_batch: int):
  """This process's block of rows [B / n, T] (`process_rows`) -> global jax.Arrays [B, T] placed by `sharding`
  (each device takes its rows and, when time is split, its positions)."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch,) + v.shape[1:])
          for k, v in local.items()}
