"""Token dispatch for selective activation: each token-slot to its FFN group and back, linear in tokens.

A token-slot is one (token, choice) pair: every token has k of them, one per chosen group. Two dispatches:

  capacity  per batch row, group e takes at most c token-slots (`group_capacity`); first choices of the row
            are queued before second choices, in time order within a choice; the rest are dropped. With the
            sequence split over S devices (mesh.sequence), each device's segment of a row is queued on its own,
            with the capacity of its t / S tokens, as expert-parallel MoEs size capacity per device. A table of
            which token fills each of the E x c slots drives one gather in and one gather out, so memory
            is O(t k D) per row (no [t, E, c] one-hot tensors). Groups run as one batched matmul [E, c, D].
  dropless  every token-slot runs: slots sorted by group, both matmuls as one grouped matmul each (a ragged
            dot: group i's rows times group i's weights), then unsorted. Its implementation is
            `model.grouped_matmul` (`GROUPED_MATMULS`): "xla" is `jax.lax.ragged_dot`, which XLA evaluates
            densely over all groups on CPU (and, by its speed, on the H100 we measured); "tokamax" is
            `tokamax.ragged_dot`, Pallas kernels that run only each group's rows (Mosaic GPU on sm90/sm100,
            H100/H200/B200; Triton on other GPUs; Mosaic TPU), each falling back to the next and last to XLA's
            where it does not apply (on CPU, always); "auto" is tokamax on GPU and TPU when it is installed
            (the `kernels` extra), else XLA.

Both run per device inside `jax.shard_map` when the trainer's mesh is active (`partitioning.active`): tokens
stay on their batch and sequence shard (no token is gathered across shards), the FFN weights are gathered over
fsdp as FSDP does, "mlp" stays split over the tensor axis (partial outputs summed by `psum`), and with the
`expert` mesh axis of p > 1 devices each device holds E / p groups and token-slots travel to their group's
device by `all_to_all` and back (`expert_axis` below: the mesh axes the rules give the groups' logical axis
"experts"). Without a mesh the same per-device code runs on the whole batch.

Shapes: the legend in docs/model.md; here n = token-slots (b t k), m and j = rows of a gather.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from yanjax.model import partitioning
from yanjax.model.layers import cast, geglu


def group_capacity(tokens: int, groups: int, top_k: int, capacity_factor: float) -> int:
  """c = min(tokens, ceil(capacity_factor * tokens * k / E)): token-slots one group takes from a row."""
  return max(1, min(tokens, math.ceil(capacity_factor * tokens * top_k / groups)))


def capacity_positions(groups: jax.Array, valid: jax.Array, num_groups: int) -> jax.Array:
  """Queue position of each token-slot in its group, counting only real tokens.

  Priority: all first choices of a row (in time order), then all second choices, and so on.

  Args:
    groups: [b, t, k] int chosen groups.
    valid: [b, t] bool real tokens.
    num_groups: E.
  Returns:
    [b, t, k] int32 position (0-based); meaningless where not valid.
  """
  b, t, k = groups.shape
  onehot = jax.nn.one_hot(groups, num_groups, dtype=jnp.int32) * valid[:, :, None, None]  # b t k E
  queue = onehot.transpose(0, 2, 1, 3).reshape(b, k * t, num_groups)  # k-major order
  pos = jnp.sum((jnp.cumsum(queue, axis=1) - 1) * queue, axis=-1)  # b (k t)
  return pos.reshape(b, k, t).transpose(0, 2, 1)


def capacity_slots(groups: jax.Array, valid: jax.Array, num_groups: int, capacity: int):
  """Where each token-slot runs under capacity dispatch.

  Returns:
    (slot [b, t, k] int32: index e * c + position into the row's E x c slots, E * c where dropped,
     kept [b, t, k] bool).
  """
  pos = capacity_positions(groups, valid, num_groups)
  kept = valid[..., None] & (pos < capacity)
  return jnp.where(kept, groups * capacity + pos, num_groups * capacity).astype(jnp.int32), kept


def _row_gather(rows: jax.Array, index: jax.Array) -> jax.Array:
  """rows [b, m, D], index [b, j] in [0, m] -> [b, j, D]; index m reads a zero row."""
  padded = jnp.pad(rows, ((0, 0), (0, 1), (0, 0)))
  return jnp.take_along_axis(padded, index[..., None], axis=1)


def _groups_geglu(x: jax.Array, gate_up: jax.Array, down: jax.Array) -> jax.Array:
  """x [m, l, c, D] (m = b rows, p b after the exchange), x[:, i] through group i's GeGLU: gate_up [l, D, 2, g],
  down [l, g, D] -> [m, l, c, D]."""
  return jax.vmap(geglu, in_axes=(1, 0, 0), out_axes=1)(x, gate_up, down)


def _capacity_local(x, groups, gates, valid, gate_up, down, *, capacity, expert_axis, mlp_axis):
  """Capacity dispatch of this device's rows: x [b, t, D] -> (y [b, t, D], kept [b, t, k])."""
  b, t, d = x.shape
  k = groups.shape[-1]
  p = 1 if expert_axis is None else jax.lax.axis_size(expert_axis)
  e = gate_up.shape[0] * p
  slot, kept = capacity_slots(groups, valid, e, capacity)
  token = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k)).reshape(t * k)
  filled_by = jnp.full((b, e * capacity), t, jnp.int32).at[jnp.arange(b)[:, None], slot.reshape(b, t * k)].set(
      token, mode="drop")  # b (E c): the token in each slot, t where empty
  xe = _row_gather(x, filled_by).reshape(b, e, capacity, d)
  if expert_axis is None:
    ye = _groups_geglu(xe, gate_up, down)
  else:  # rows of every device meet at each group's device: [p b, l, c, D] there
    xe = jax.lax.all_to_all(xe, expert_axis, split_axis=1, concat_axis=0, tiled=True)
    ye = _groups_geglu(xe, gate_up, down)
    ye = jax.lax.all_to_all(ye, expert_axis, split_axis=0, concat_axis=1, tiled=True)
  y_slots = _row_gather(ye.reshape(b, e * capacity, d), slot.reshape(b, t * k)).reshape(b, t, k, d)
  y = jnp.einsum("btkd,btk->btd", y_slots, cast(gates * kept, x.dtype), preferred_element_type=jnp.float32)
  if mlp_axis is not None:
    y = jax.lax.psum(y, mlp_axis)
  return y.astype(x.dtype), kept


GROUPED_MATMULS = ("auto", "xla", "tokamax")  # model.grouped_matmul
KERNELS_INSTALL = 'pip install -e ".[kernels]" -c constraints.txt'  # what installs tokamax


def tokamax_installed() -> bool:
  """Whether tokamax can be imported (without importing it: that takes seconds)."""
  return importlib.util.find_spec("tokamax") is not None


def grouped_matmul_implementation(choice: str, platform: str | None = None) -> str:
  """The implementation `model.grouped_matmul` = `choice` runs on `platform` ("cpu", "gpu", "tpu"; None: jax's
  default backend): "xla" or "tokamax"."""
  if choice != "auto":
    return choice
  platform = platform or jax.default_backend()
  return "tokamax" if platform in ("gpu", "tpu") and tokamax_installed() else "xla"


def _tokamax_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """tokamax.ragged_dot: its best kernel for the device, with its own backward (tokamax is optional)."""
  import tokamax  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel

  # tokamax 0.0.12 reads its options from absl's flags and, when nothing has parsed them (pytest, and every
  # command but yanjax.main.train), parses sys.argv itself, failing on any argument it does not know
  # (openxla/tokamax#957, fixed after 0.0.12): take the flags' defaults instead.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax.ragged_dot(lhs, rhs, group_sizes)


# implementation -> ragged_dot(lhs [m, K], rhs [l, K, N], group_sizes [l]) -> [m, N]: rows sorted by group, the
# first group_sizes[0] rows times rhs[0], and so on; rows past sum(group_sizes) are left undefined.
RAGGED_DOTS = {"xla": jax.lax.ragged_dot, "tokamax": _tokamax_ragged_dot}


def _grouped_geglu(x: jax.Array, group: jax.Array, gate_up: jax.Array, down: jax.Array, ragged_dot) -> jax.Array:
  """Row i of x [m, D] through group[i]'s GeGLU (group l: no group, output 0) by `ragged_dot` -> [m, D]."""
  m, d = x.shape
  local, _, _, g = gate_up.shape
  order = jnp.argsort(group, stable=True)
  sizes = jnp.zeros((local,), jnp.int32).at[group].add(1, mode="drop")
  # Rows past sum(sizes) (padding slots, sorted last) are not defined by every kernel, forward or backward: each
  # matmul's input and output is masked there, so neither garbage values nor garbage gradients get out.
  live = (jnp.take(group, order) < local)[:, None]
  xs = jnp.where(live, jnp.take(x, order, axis=0), 0)
  h = jnp.where(live, ragged_dot(xs, gate_up.reshape(local, d, 2 * g), sizes), 0).reshape(m, 2, g)
  y = jnp.where(live, ragged_dot(jax.nn.gelu(h[:, 0]) * h[:, 1], down, sizes), 0)
  return jnp.zeros_like(y).at[order].set(y, unique_indices=True)


def _exchange_and_run(x, group, gate_up, down, expert_axis, ragged_dot):
  """Slots x [n, D] of groups `group` [n] (E: none) to their groups' devices, through them, and back."""
  n, d = x.shape
  p = jax.lax.axis_size(expert_axis)
  local = gate_up.shape[0]
  device = jnp.minimum(group // local, p)  # p: no device (padding)
  order = jnp.argsort(device, stable=True)
  counts = jnp.zeros((p,), jnp.int32).at[device].add(1, mode="drop")
  starts = jnp.cumsum(counts) - counts
  index = jnp.minimum(starts[:, None] + jnp.arange(n)[None, :], n - 1)  # p n: slot order of each send buffer
  live = jnp.arange(n)[None, :] < counts[:, None]
  sorted_slots = jnp.take(order, index)
  send = jnp.where(live[..., None], jnp.take(x, sorted_slots, axis=0), 0)  # p n D, worst case: all to one
  send_group = jnp.where(live, jnp.take(group, sorted_slots) - jnp.arange(p)[:, None] * local, local)
  received = jax.lax.all_to_all(send, expert_axis, 0, 0, tiled=True)
  received_group = jax.lax.all_to_all(send_group, expert_axis, 0, 0, tiled=True)
  out = _grouped_geglu(received.reshape(p * n, d), received_group.reshape(p * n), gate_up, down, ragged_dot)
  back = jax.lax.all_to_all(out.reshape(p, n, d), expert_axis, 0, 0, tiled=True)  # p n D, in send order
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))  # slot -> sorted position
  mine = jnp.minimum(device, p - 1)
  y = back[mine, rank - starts[mine]]
  return jnp.where((device < p)[:, None], y, 0)


def _dropless_local(x, groups, gates, valid, gate_up, down, *, ragged_dot, expert_axis, mlp_axis):
  """Dropless dispatch of this device's rows: x [b, t, D] -> (y [b, t, D], kept [b, t, k] = valid)."""
  b, t, d = x.shape
  k = groups.shape[-1]
  p = 1 if expert_axis is None else jax.lax.axis_size(expert_axis)
  e = gate_up.shape[0] * p
  slot_group = jnp.where(valid[..., None], groups, e).reshape(b * t * k)
  slot_x = jnp.repeat(x.reshape(b * t, d), k, axis=0)  # n D
  if expert_axis is None:
    y_slots = _grouped_geglu(slot_x, slot_group, gate_up, down, ragged_dot)
  else:
    y_slots = _exchange_and_run(slot_x, slot_group, gate_up, down, expert_axis, ragged_dot)
  y = jnp.einsum("nkd,nk->nd", y_slots.reshape(b * t, k, d), cast((gates * valid[..., None]).reshape(b * t, k),
                 x.dtype), preferred_element_type=jnp.float32)
  if mlp_axis is not None:
    y = jax.lax.psum(y, mlp_axis)
  return y.reshape(b, t, d).astype(x.dtype), jnp.broadcast_to(valid[..., None], (b, t, k))


def _mesh_axes(spec_entry):
  """A PartitionSpec entry as an axis name argument of a collective (None: not split)."""
  return spec_entry if spec_entry is None or isinstance(spec_entry, str) else tuple(spec_entry)


def _dispatch(local_fn, x, groups, gates, valid, gate_up, down):
  """local_fn on each device's rows inside shard_map when a mesh is active, else on everything."""
  gate_up, down = cast(gate_up, x.dtype), cast(down, x.dtype)
  active = partitioning.active()
  if active is None:
    return local_fn(x, groups, gates, valid, gate_up, down, expert_axis=None, mlp_axis=None)
  mesh, to_spec = active
  rows = PartitionSpec(*to_spec(("batch", "length"), x.shape[:2]))  # each device's tokens
  group_spec, _, _, mlp_spec = to_spec(("experts", None, None, "mlp"), gate_up.shape)  # the groups' mesh axes
  fn = functools.partial(local_fn, expert_axis=_mesh_axes(group_spec), mlp_axis=_mesh_axes(mlp_spec))
  weight_specs = (PartitionSpec(group_spec, None, None, mlp_spec), PartitionSpec(group_spec, mlp_spec, None))
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=(rows, rows, rows, rows, *weight_specs), out_specs=(rows, rows))
  return mapped(x, groups, gates, valid, gate_up, down)


def capacity_dispatch(x, groups, gates, valid, gate_up, down, capacity: int):
  """Token dropping per row.

  Args:
    x: [b, t, D] compute dtype; groups: [b, t, k] int; gates: [b, t, k] float32; valid: [b, t] bool.
    gate_up: [E, D, 2, g]; down: [E, g, D] (float32 parameters; cast to x.dtype).
    capacity: c, token-slots per group and row.
  Returns:
    (y [b, t, D] in x.dtype, kept [b, t, k] bool).
  """
  return _dispatch(functools.partial(_capacity_local, capacity=capacity), x, groups, gates, valid, gate_up, down)


def dropless_dispatch(x, groups, gates, valid, gate_up, down, grouped_matmul: str = "auto"):
  """Every token-slot runs; arguments as `capacity_dispatch` without `capacity`; `grouped_matmul`: one of
  GROUPED_MATMULS (`grouped_matmul_implementation`)."""
  ragged_dot = RAGGED_DOTS[grouped_matmul_implementation(grouped_matmul)]
  return _dispatch(functools.partial(_dropless_local, ragged_dot=ragged_dot), x, groups, gates, valid, gate_up, down)


DISPATCHES = {"capacity": capacity_dispatch, "dropless": dropless_dispatch}  # model.dispatch -> the function
