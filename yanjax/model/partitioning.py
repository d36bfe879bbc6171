"""Logical axis names on activations: a sharding constraint when a mesh and rules are active, else nothing.

The trainer enters `activation_sharding(mesh, rules)` around tracing its step; model code calls
`constrain(x, ("batch", "length", "embed"))` at layer boundaries, so activation placement follows the same
rules table as the parameters (yanjax.sharding) and the model itself never names a mesh axis.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

_ACTIVE = contextvars.ContextVar("yanjax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, to_spec):
  """Within the block, `constrain` places activations by `to_spec(axes, shape) -> PartitionSpec` on `mesh`."""
  token = _ACTIVE.set((mesh, to_spec))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """x with a sharding constraint from its logical `axes` (one per dimension), if a context is active."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, to_spec = active
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, to_spec(axes, x.shape)))
