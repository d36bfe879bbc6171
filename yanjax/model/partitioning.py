"""Logical axis names on activations: a sharding constraint when a mesh and rules are active, else nothing.

The trainer enters `activation_sharding(mesh, rules)` around tracing its step; model code calls
`constrain(x, ("batch", "length", "embed"))` at layer boundaries, so activation placement follows the same
rules table as the parameters (yanjax.training.sharding) and the model itself never names a mesh axis. A `Term` names
the logical axes of activations a module keeps, for the memory plan (yanjax.training.plan).

Sequence parallelism: when the rules split "length" (time) over S devices, code that runs along time (a scan, the
loss's chunks) cuts each sequence into its S segments, one per device, and runs them as S b rows
(`to_segments`), segment-major so that each device's rows are its own segments: the logical axes of those rows
are SEGMENT_ROWS.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_ACTIVE = contextvars.ContextVar("yanjax_activation_sharding", default=None)
SEGMENT_ROWS = ("length", "batch")  # logical axes of the rows [S b] of `to_segments`: segment-major


class Term(NamedTuple):
  """`count` arrays of shape [b, t, *dims] with logical axes ("batch", "length", *axes); shapes: docs/model.md."""
  what: str
  dims: tuple[int, ...]
  axes: tuple[str | None, ...]
  itemsize: int
  count: float = 1.0


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, to_spec):
  """Within the block, `constrain` places activations by `to_spec(axes, shape) -> PartitionSpec` on `mesh`."""
  token = _ACTIVE.set((mesh, to_spec))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[jax.sharding.Mesh, object] | None:
  """(mesh, to_spec) of the enclosing `activation_sharding` block, or None outside one."""
  return _ACTIVE.get()


def map_blocks(fn, in_axes, out_axes, *arrays):
  """fn(*arrays) computed on each device's block of the arrays inside `jax.shard_map` when a mesh is active, else
  on the whole arrays. `in_axes` holds each array's logical axes, `out_axes` each output's (a tuple per output,
  in fn's output structure); fn must treat the blocks independently. Keeps ops XLA cannot partition (top_k,
  sort, a Pallas kernel) from gathering whole arrays onto every device."""
  current = _ACTIVE.get()
  if current is None:
    return fn(*arrays)
  mesh, to_spec = current
  in_specs = tuple(to_spec(axes, a.shape) for axes, a in zip(in_axes, arrays, strict=True))
  out_specs = jax.tree.map(lambda shape, axes: to_spec(axes, shape.shape), jax.eval_shape(fn, *arrays), out_axes)
  # check_vma off: a Pallas kernel's outputs declare no varying mesh axes (autodiff stays exact without the check).
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*arrays)


def map_tokens(fn, *arrays):
  """`map_blocks` over the tokens (dimensions 0 and 1, logical "batch" and "length") of arrays and outputs alike:
  fn must treat every token on its own."""
  def tokens(a):
    return ("batch", "length") + (None,) * (a.ndim - 2)
  outputs = jax.eval_shape(fn, *arrays)
  return map_blocks(fn, [tokens(a) for a in arrays], jax.tree.map(tokens, outputs), *arrays)


def length_ways(t: int) -> int:
  """S: the devices the active rules split a sequence of t positions over (1 outside a mesh, or unsplit)."""
  current = _ACTIVE.get()
  if current is None:
    return 1
  mesh, to_spec = current
  entry = to_spec(("length",), (t,))[0]
  return math.prod(mesh.shape[axis] for axis in ((entry,) if isinstance(entry, str) else entry or ()))


def to_segments(a: jax.Array, segments: int, axes: tuple[str | None, ...] = ()) -> jax.Array:
  """a [b, t, ...] -> [S b, t / S, ...]: row s b + i is segment s of sequence i (S = `segments`), each device's
  own segments when a mesh is active; `axes`: the logical axes of a's dimensions after t (default: unsplit)."""
  b, t = a.shape[:2]
  rows = jnp.swapaxes(a.reshape(b, segments, t // segments, *a.shape[2:]), 0, 1)
  axes = axes or (None,) * (a.ndim - 2)
  return constrain(rows.reshape(segments * b, t // segments, *a.shape[2:]), (SEGMENT_ROWS, None, *axes))


def from_segments(a: jax.Array, segments: int, axes: tuple[str | None, ...] = ()) -> jax.Array:
  """The inverse of `to_segments`: [S b, t / S, ...] -> [b, t, ...]."""
  rows, tl = a.shape[:2]
  b = rows // segments
  out = jnp.swapaxes(a.reshape(segments, b, tl, *a.shape[2:]), 0, 1).reshape(b, segments * tl, *a.shape[2:])
  return constrain(out, ("batch", "length", *(axes or (None,) * (a.ndim - 2))))


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """x with a sharding constraint from its logical `axes` (one per dimension), if a context is active."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, to_spec = active
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, to_spec(axes, x.shape)))
