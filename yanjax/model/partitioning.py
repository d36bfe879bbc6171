"""Logical axis names on activations: a sharding constraint when a mesh and rules are active, else nothing.

The trainer enters `activation_sharding(mesh, rules)` around tracing its step; model code calls
`constrain(x, ("batch", "length", "embed"))` at layer boundaries, so activation placement follows the same
rules table as the parameters (yanjax.training.sharding) and the model itself never names a mesh axis. A `Term` names
the logical axes of activations a module keeps, for the memory plan (yanjax.training.plan).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import jax

_ACTIVE = contextvars.ContextVar("yanjax_activation_sharding", default=None)


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


def map_rows(fn, *arrays):
  """`map_blocks` over the batch rows (dimension 0, logical "batch") of arrays and outputs alike."""
  def rows(a):
    return ("batch",) + (None,) * (a.ndim - 1)
  outputs = jax.eval_shape(fn, *arrays)
  return map_blocks(fn, [rows(a) for a in arrays], jax.tree.map(rows, outputs), *arrays)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """x with a sharding constraint from its logical `axes` (one per dimension), if a context is active."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, to_spec = active
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, to_spec(axes, x.shape)))
