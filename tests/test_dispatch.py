"""Token dispatch (yanjax/model/dispatch.py): the gather-based capacity dispatch against the one-hot reference
it replaced, linear memory in t, dropless's grouped matmuls (tokamax's against XLA's), and sharded runs (expert
all-to-all) against one device."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from yanjax.core.config import ConfigError
from yanjax.model import config as model_config
from yanjax.model import dispatch
from yanjax.model.config import ModelConfig
from yanjax.model.dispatch import capacity_dispatch, capacity_positions, dropless_dispatch, group_capacity
from yanjax.model.layers import cast, geglu
from yanjax.model.selective import SelectiveFFN
from yanjax.training import sharding
from yanjax.training.run_config import DEFAULTS

D, E, K, F, H = 16, 8, 2, 8, 8
T = 12  # tokens per row: the only model-visible size with a factor 3 (every parameter dim is a power of 2)
RULES = {name: tuple(axes) for name, axes in DEFAULTS["rules"]}


def one_hot_capacity(x, groups, gates, valid, gate_up, down, capacity):
  """The capacity dispatch yanjax shipped before: one-hot dispatch and combine tensors [b, t, E, c]."""
  pos = capacity_positions(groups, valid, E)
  kept = valid[..., None] & (pos < capacity)
  to_group = jax.nn.one_hot(groups, E, dtype=jnp.float32) * kept[..., None]
  to_slot = jax.nn.one_hot(pos, capacity, dtype=jnp.float32)
  dispatch = jnp.einsum("btke,btkc->btec", to_group, to_slot)
  combine = jnp.einsum("btke,btkc,btk->btec", to_group, to_slot, gates)
  xe = jnp.einsum("btec,btd->becd", cast(dispatch, x.dtype), x)
  ye = jax.vmap(geglu, in_axes=(1, 0, 0), out_axes=1)(xe, gate_up, down)
  y = jnp.einsum("btec,becd->btd", cast(combine, x.dtype), ye, preferred_element_type=jnp.float32)
  return y.astype(x.dtype), kept


def randn(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def routing(b, t, seed):
  """Random distinct groups [b, t, K], gates [b, t, K] and a mask with a padded tail in row 1."""
  rng = np.random.default_rng(seed)
  groups = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(t)]) for _ in range(b)]).astype(np.int32)
  gates = rng.uniform(0.1, 1.0, (b, t, K)).astype(np.float32)
  valid = np.ones((b, t), bool)
  valid[1, t // 2:] = False
  return jnp.asarray(groups), jnp.asarray(gates), jnp.asarray(valid)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 4.0])
@pytest.mark.slow
def test_capacity_gather_equals_one_hot_reference(capacity_factor):
  b, t = 3, 24
  x = randn((b, t, D), 1)
  groups, gates, valid = routing(b, t, 2)
  gate_up, down = randn((E, D, 2, F), 3) * 0.3, randn((E, F, D), 4) * 0.3
  cap = group_capacity(t, E, K, capacity_factor)
  y, kept = capacity_dispatch(x, groups, gates, valid, gate_up, down, cap)
  y_ref, kept_ref = one_hot_capacity(x, groups, gates, valid, gate_up, down, cap)
  print(f"capacity {cap}: kept {int(kept.sum())} of {int(valid.sum()) * K}; max |y - one-hot| =",
        float(jnp.max(jnp.abs(y - y_ref))))
  np.testing.assert_array_equal(kept, kept_ref)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  weights = randn((b, t, D), 5)

  def loss(fn, *args):
    return jnp.sum(fn(*args, cap)[0] * weights)

  grads = jax.grad(lambda *a: loss(capacity_dispatch, *a), argnums=(0, 2, 4, 5))(x, groups, gates, valid, gate_up,
                                                                                  down)
  grads_ref = jax.grad(lambda *a: loss(one_hot_capacity, *a), argnums=(0, 2, 4, 5))(x, groups, gates, valid,
                                                                                     gate_up, down)
  for name, g, g_ref in zip(("x", "gates", "gate_up", "down"), grads, grads_ref):
    print(name, "grad max err", float(jnp.max(jnp.abs(g - g_ref))), "scale", float(jnp.max(jnp.abs(g_ref))))
    np.testing.assert_allclose(g, g_ref, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(g_ref)))))


def _step_temp_bytes(t):
  """Compiled temporaries of forward + backward of capacity dispatch of one row of t tokens."""
  x = jax.ShapeDtypeStruct((1, t, D), jnp.float32)
  groups = jax.ShapeDtypeStruct((1, t, K), jnp.int32)
  gates = jax.ShapeDtypeStruct((1, t, K), jnp.float32)
  valid = jax.ShapeDtypeStruct((1, t), jnp.bool_)
  gate_up, down = jax.ShapeDtypeStruct((E, D, 2, F), jnp.float32), jax.ShapeDtypeStruct((E, F, D), jnp.float32)
  cap = group_capacity(t, E, K, 1.25)

  def loss(fn, x, groups, gates, valid, gate_up, down):
    return jnp.sum(fn(x, groups, gates, valid, gate_up, down, cap)[0])

  sizes = {}
  for name, fn in (("gather", capacity_dispatch), ("one-hot", one_hot_capacity)):
    grad = jax.jit(jax.grad(lambda *a, fn=fn: loss(fn, *a), argnums=(0, 2, 4, 5)))
    sizes[name] = grad.lower(x, groups, gates, valid, gate_up, down).compile().memory_analysis().temp_size_in_bytes
  return sizes


def test_capacity_memory_is_linear_in_tokens():
  small, large = _step_temp_bytes(1024), _step_temp_bytes(8192)
  for name in small:
    print(f"{name}: temporaries {small[name] / 2**20:.2f} MiB at t=1024, {large[name] / 2**20:.2f} MiB at "
          f"t=8192 (x{large[name] / small[name]:.1f} for x8 tokens)")
  assert large["gather"] / small["gather"] < 8 * 1.25
  assert large["one-hot"] / small["one-hot"] > 30  # the reference it replaced grows as t squared


# ---- dropless's grouped matmul: tokamax's == XLA's ----------------------------------------------------------

def _poisoned_ragged_dot():
  """jax.lax.ragged_dot with NaN in the rows past sum(group_sizes), of its output and of its lhs cotangent:
  what a kernel that leaves them undefined may give."""

  def poison(rows, sizes):
    return jnp.where(jnp.arange(rows.shape[0])[:, None] < jnp.sum(sizes), rows, jnp.nan)

  @jax.custom_vjp
  def ragged_dot(lhs, rhs, sizes):
    return poison(jax.lax.ragged_dot(lhs, rhs, sizes), sizes)

  def fwd(lhs, rhs, sizes):
    return ragged_dot(lhs, rhs, sizes), (lhs, rhs, sizes)

  def bwd(res, dout):
    lhs, rhs, sizes = res
    dlhs, drhs = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, sizes), lhs, rhs)[1](dout)
    return poison(dlhs, sizes), drhs, None

  ragged_dot.defvjp(fwd, bwd)
  return ragged_dot


@pytest.fixture
def interpreted_tokamax_kernel(monkeypatch):
  """tokamax's Mosaic-TPU grouped matmul (megablox's gmm and tgmm kernels, with tokamax's backward) in Pallas's
  interpret mode on this CPU. Test-only shims: tokamax offers interpret mode only for this kernel and only on a
  TPU (`supported_on`), and Pallas's TPU pipeline asks the device for its TPU generation (a v5e's answered, and
  forgotten after the test)."""
  from jax._src.pallas.mosaic import tpu_info  # pylint: disable=import-outside-toplevel
  from tokamax._src.ops.ragged_dot import pallas_mosaic_tpu  # pylint: disable=import-outside-toplevel

  kernel = pallas_mosaic_tpu.PallasMosaicTpuRaggedDot
  monkeypatch.setattr(kernel, "supported_on", lambda self, device: True)
  monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                      lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))
  op = kernel(interpret=True, config=None)
  assert dataclasses.is_dataclass(op) and op.interpret
  yield lambda lhs, rhs, sizes: op(lhs, rhs, group_sizes=sizes)
  tpu_info.get_tpu_info.cache_clear()


def _dropless_case(d, g, b, t, groups_used):
  """Dropless inputs of E groups of which only the first `groups_used` are chosen (the rest empty), row 1's second
  half padding: (x, groups, gates, valid, gate_up, down), float32."""
  rng = np.random.default_rng(7)
  groups = np.stack([np.stack([rng.permutation(groups_used)[:K] for _ in range(t)]) for _ in range(b)])
  gates = rng.uniform(0.1, 1.0, (b, t, K)).astype(np.float32)
  valid = np.ones((b, t), bool)
  valid[1, t // 2:] = False
  return (randn((b, t, d), 1), jnp.asarray(groups, jnp.int32), jnp.asarray(gates), jnp.asarray(valid),
          randn((E, d, 2, g), 2) * d ** -0.5, randn((E, g, d), 3) * g ** -0.5)


def _dropless_and_grads(grouped_matmul, case):
  """Dropless outputs and the gradients of a weighted sum w.r.t. x, gates and both weights."""
  x, groups, gates, valid, gate_up, down = case
  weights = randn(x.shape, 5)

  def loss(x, gates, gate_up, down):
    y, _ = dropless_dispatch(x, groups, gates, valid, gate_up, down, grouped_matmul)
    return jnp.sum(y * weights), y

  grads, y = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, gates, gate_up, down)
  return y, grads


@pytest.mark.parametrize("kernel", ["tokamax", "rows past the groups undefined", "tokamax Pallas, interpreted"])
def test_dropless_grouped_matmul_equals_xla(kernel, monkeypatch, request):
  """tokamax: the public `tokamax.ragged_dot` as the model calls it, which on CPU runs its XLA implementation
  (its Pallas kernels are GPU and TPU only), so this checks the plumbing (its custom VJP, shapes, dtypes).
  Rows past the groups undefined: a kernel that leaves padding slots' rows as garbage changes nothing.
  Interpreted: a tokamax Pallas kernel itself (its TPU one; its GPU kernels have no interpret mode), forward and
  backward, at the smallest shape it takes (every matmul dimension >= 128)."""
  if kernel.startswith("tokamax"):
    pytest.importorskip("tokamax")  # the test extra installs it
  case = _dropless_case(d=D, g=F, b=2, t=T, groups_used=E - 2)
  if kernel == "rows past the groups undefined":
    monkeypatch.setitem(dispatch.RAGGED_DOTS, "tokamax", _poisoned_ragged_dot())
  elif kernel == "tokamax Pallas, interpreted":
    monkeypatch.setitem(dispatch.RAGGED_DOTS, "tokamax", request.getfixturevalue("interpreted_tokamax_kernel"))
    case = _dropless_case(d=128, g=128, b=2, t=32, groups_used=E - 2)
  assert int(case[3].sum()) * K < case[0].shape[0] * case[0].shape[1] * K  # padding slots, sorted last
  y_ref, grads_ref = _dropless_and_grads("xla", case)
  y, grads = _dropless_and_grads("tokamax", case)
  print(kernel, "max |y - xla|", float(jnp.max(jnp.abs(y - y_ref))), "scale", float(jnp.max(jnp.abs(y_ref))))
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  for name, g, g_ref in zip(("x", "gates", "gate_up", "down"), grads, grads_ref):
    scale = max(1.0, float(jnp.max(jnp.abs(g_ref))))
    print(name, "grad max err", float(jnp.max(jnp.abs(g - g_ref))), "scale", scale)
    np.testing.assert_allclose(g, g_ref, atol=1e-5 * scale)
  assert float(jnp.max(jnp.abs(grads_ref[3][E - 2:]))) == 0.0  # the empty groups' weights get no gradient


def test_grouped_matmul_choice_and_missing_tokamax(monkeypatch):
  monkeypatch.setattr(dispatch, "tokamax_installed", lambda: True)
  assert [dispatch.grouped_matmul_implementation("auto", p) for p in ("cpu", "gpu", "tpu")] == ["xla", "tokamax",
                                                                                                  "tokamax"]
  assert dispatch.grouped_matmul_implementation("tokamax", "cpu") == "tokamax"
  monkeypatch.setattr(dispatch, "tokamax_installed", lambda: False)
  assert dispatch.grouped_matmul_implementation("auto", "gpu") == "xla"
  monkeypatch.setattr(model_config, "tokamax_installed", lambda: False)
  selective = dict(router=True, width=D, mlp_width=E * F, groups=E, top_k=K)
  ModelConfig(**selective, dispatch="capacity", grouped_matmul="tokamax")  # no grouped matmul to run: accepted
  missing = f"model.grouped_matmul='tokamax': tokamax is not installed; install it with `{dispatch.KERNELS_INSTALL}`"
  with pytest.raises(ConfigError, match=re.escape(missing)):
    ModelConfig(**selective, dispatch="dropless", grouped_matmul="tokamax")
  with pytest.raises(ConfigError, match="model.grouped_matmul='triton': must be one of"):
    ModelConfig(**selective, grouped_matmul="triton")


# ---- sharded == single device -----------------------------------------------------------------------------

def make_ffn(dispatch):
  cfg = ModelConfig(router=True, width=D, mlp_width=E * F, groups=E, top_k=K, router_hidden=H, init_std=0.3,
                    dispatch=dispatch, capacity_factor=1.0, explore_steps=10)
  return nnx.split(nnx.jit(lambda: SelectiveFFN(cfg, rngs=nnx.Rngs(0)))())


def all_gathered_shapes(compiled_text):
  """Result shapes of every all-gather in compiled HLO text, e.g. [(16, 8), (4, 16, 2, 8)]."""
  found = re.findall(r"= \(?\w+\[([\d,]*)\][^=]*? all-gather(?:-start)?\(", compiled_text)
  return [tuple(int(n) for n in dims.split(",") if n) for dims in found]


MESHES = [{"data": 1, "fsdp": 4, "tensor": 1, "expert": 2},
          {"data": 1, "fsdp": 2, "tensor": 1, "expert": 4},
          {"data": 2, "fsdp": 1, "tensor": 2, "expert": 2}]


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.slow
def test_sharded_ffn_equals_single_device_and_gathers_no_tokens(dispatch):
  graphdef, params = make_ffn(dispatch)
  x = randn((8, T, D), 1)
  mask = jnp.ones((8, T), bool).at[3, 6:].set(False)
  weights = randn((8, T, D), 2)
  key = jax.random.key(3)

  def loss(params, x):
    y, stats = nnx.merge(graphdef, params)(x, step=4, key=key, mask=mask)
    return jnp.sum(y * weights) + stats.lb_loss + stats.z_loss, (y, stats)

  value_and_grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (_, (y, stats)), grads = jax.jit(value_and_grad)(params, x)
  for mesh_cfg in MESHES:
    mesh = sharding.make_mesh(mesh_cfg)
    rows = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch", "length", "embed"), x.shape, RULES,
                                                                     mesh))
    sharded = jax.jit(sharding.with_activation_rules(value_and_grad, mesh, RULES),
                      in_shardings=(sharding.state_shardings(params, RULES, mesh), rows))
    (_, (y_s, stats_s)), grads_s = sharded(params, x)
    grad_err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_s)))
    gathered = all_gathered_shapes(sharded.lower(params, x).compile().as_text())
    print(dispatch, mesh_cfg, "max |y - single|", float(jnp.max(jnp.abs(y - y_s))), "max grad err", grad_err,
          "dropped", float(stats_s.dropped_fraction), "all-gathers", gathered)
    np.testing.assert_allclose(y_s, y, atol=1e-5)
    assert grad_err < 5e-5  # float32 sums in another order (3.5e-5 seen with XLA's LLVM optimisation off)
    np.testing.assert_allclose(stats_s.dropped_fraction, stats.dropped_fraction, atol=1e-7)
    np.testing.assert_allclose(stats_s.load, stats.load, atol=1e-6)
    assert not [s for s in gathered if any(n % 3 == 0 for n in s)], "token activations were all-gathered"
  if dispatch == "capacity":
    assert float(stats.dropped_fraction) > 0.1  # the comparison covers dropping
