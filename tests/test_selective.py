"""Selective activation (yanjax/model/selective.py) against NumPy hand computations and per-token loops."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from yanjax.model.config import ModelConfig
from yanjax.model.dispatch import capacity_positions, group_capacity
from yanjax.model.selective import RouterStats, SelectiveFFN, exploration_weight

D, E, K, G, R = 16, 4, 2, 8, 8  # width, groups, groups per token (k), group width (g), router hidden


def make_cfg(**changes):
  base = dict(router=True, width=D, mlp_width=E * G, groups=E, top_k=K, router_hidden=R, init_std=0.3,
              capacity_factor=E / K, explore_steps=100)
  return ModelConfig(**{**base, **changes})


@functools.cache
def _init_state(seed):
  """Parameters of the base config, initialised in one compiled call (eager init compiles per shape)."""
  cfg = make_cfg()
  return nnx.state(nnx.jit(lambda: SelectiveFFN(cfg, rngs=nnx.Rngs(seed)))())


def make_ffn(seed=0, **changes):
  """A SelectiveFFN of make_cfg(**changes) holding the seed's parameters (changes must keep the shapes)."""
  ffn = nnx.eval_shape(lambda: SelectiveFFN(make_cfg(**changes), rngs=nnx.Rngs(seed)))
  nnx.update(ffn, _init_state(seed))
  return ffn


def randn(shape, seed):
  """Float32 normal values from NumPy (jax.random compiles per shape, which costs seconds on CPU)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def inputs(b=2, t=16, seed=1):
  return randn((b, t, D), seed)


# ---------------------------------------------------------------- NumPy references (float64)

def np_gelu(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def np_params(ffn):
  return {name: np.asarray(getattr(ffn, name)[...], np.float64)
          for name in ("router_in", "router_out", "gate_up", "down")}


def np_logits(ffn, x):
  p = np_params(ffn)
  return np_gelu(np.asarray(x, np.float64) @ p["router_in"]) @ p["router_out"]


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def np_topk(scores, k):
  return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def np_hand_keep(groups, valid, capacity):
  """Per row, first choices before second choices, time order within; a slot runs if its group has room."""
  b, t, k = groups.shape
  keep = np.zeros((b, t, k), bool)
  for i in range(b):
    used = np.zeros(E, int)
    for j in range(k):
      for s in range(t):
        if valid[i, s]:
          g = groups[i, s, j]
          keep[i, s, j] = used[g] < capacity
          used[g] += 1
  return keep


def np_reference(ffn, x, groups, gates, keep):
  """Naive per-token loop: y[b, t] = sum over kept chosen groups of gate * GeGLU_e(x[b, t])."""
  p = np_params(ffn)
  x = np.asarray(x, np.float64)
  y = np.zeros_like(x)
  for i in range(x.shape[0]):
    for s in range(x.shape[1]):
      for j in range(groups.shape[-1]):
        if keep[i, s, j]:
          e = groups[i, s, j]
          h = np.einsum("d,dkf->kf", x[i, s], p["gate_up"][e])
          y[i, s] += gates[i, s, j] * (np_gelu(h[0]) * h[1]) @ p["down"][e]
  return y


def np_gates(probs, groups):
  chosen = np.take_along_axis(probs, groups, -1)
  return chosen / chosen.sum(-1, keepdims=True)


def np_stats(logits, groups, valid):
  v = valid.astype(np.float64)
  n = v.sum()
  probs = np_softmax(logits)
  slots = np.zeros(logits.shape)
  for j in range(groups.shape[-1]):
    slots += np.eye(E)[groups[..., j]]
  load = (slots * v[..., None]).sum((0, 1)) / (n * groups.shape[-1])
  mean_prob = (probs * v[..., None]).sum((0, 1)) / n
  lse = np.log(np.exp(logits).sum(-1))
  entropy = -(probs * np.log(probs)).sum(-1)
  return dict(lb_loss=E * (load * mean_prob).sum(), z_loss=(lse ** 2 * v).sum() / n, load=load,
              entropy=(entropy * v).sum() / n)


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------- tests

def test_parameter_layout():
  ffn = nnx.eval_shape(lambda: SelectiveFFN(make_cfg(), rngs=nnx.Rngs(0)))
  expected = {
      "router_in": ((D, R), ("embed", None)),
      "router_out": ((R, E), (None, "experts")),
      "gate_up": ((E, D, 2, G), ("experts", "embed", None, "mlp")),
      "down": ((E, G, D), ("experts", "mlp", "embed")),
  }
  params = nnx.state(ffn, nnx.Param)
  assert set(params.keys()) == set(expected)
  for name, (shape, axes) in expected.items():
    var = getattr(ffn, name)
    assert isinstance(var, nnx.Param) and var.shape == shape and var.dtype == jnp.float32, name
    assert tuple(var.get_metadata()["out_sharding"]) == axes, name
  values = _init_state(0)  # init_std 0.3; down uses half of it
  stds = {name: float(np.std(np.asarray(values[name][...]))) for name in expected}
  print("init stds", stds)
  for name in ("router_in", "router_out", "gate_up"):
    assert stds[name] == pytest.approx(0.3, rel=0.3), name
  assert stds["down"] == pytest.approx(0.15, rel=0.3)
  with pytest.raises(ValueError, match="router"):
    SelectiveFFN(make_cfg(router=False), rngs=nnx.Rngs(0))


def test_schedule():
  assert float(exploration_weight(0, 100)) == 1.0
  assert float(exploration_weight(50, 100)) == pytest.approx(0.5)
  assert float(exploration_weight(100, 100)) == 0.0
  assert float(exploration_weight(10_000, 100)) == 0.0
  assert float(exploration_weight(None, 100)) == 0.0
  assert float(exploration_weight(0, 0)) == 0.0
  lams = np.asarray(jax.jit(lambda s: exploration_weight(s, 100))(jnp.arange(0, 200)))
  print("lam[0], lam[99], lam[100]:", lams[0], lams[99], lams[100])
  assert np.all(np.diff(lams) <= 0) and np.all(lams >= 0) and lams[0] == 1.0 and np.all(lams[100:] == 0)


def test_choice_random_at_step_zero_and_learned_after():
  x = inputs()
  key = jax.random.key(7)
  a, b = make_ffn(seed=0), make_ffn(seed=0)
  b.router_in.value = randn(b.router_in.shape, 3)
  b.router_out.value = randn(b.router_out.shape, 4)
  ra, rb = a.route(x, step=0, key=key), b.route(x, step=0, key=key)
  noise = np.asarray(jax.random.uniform(key, (2, 16, E), jnp.float32))
  print("step 0 group mismatches between routers:", int(np.sum(ra.groups != rb.groups)))
  np.testing.assert_array_equal(ra.groups, rb.groups)  # the router has no say at step 0
  np.testing.assert_array_equal(np.sort(ra.groups, -1), np.sort(np_topk(noise, K), -1))
  learned = np.sort(np_topk(np.asarray(ra.probs), K), -1)
  assert np.any(np.sort(ra.groups, -1) != learned)  # the random choice is not the router's
  assert float(ra.explore) == 1.0
  for step in (100, 250):
    r = a.route(x, step=step, key=key)
    probs = np_softmax(np_logits(a, x))
    print(f"step {step}: max |probs - numpy| =", max_err(r.probs, probs))
    assert max_err(r.probs, probs) < 1e-5
    np.testing.assert_array_equal(np.sort(r.groups, -1), np.sort(np_topk(probs, K), -1))
    assert float(r.explore) == 0.0
  r = a.route(x, step=50, key=key)  # halfway: top-k of the mixed scores
  mixed = 0.5 * np.asarray(r.probs, np.float64) + 0.5 * noise
  np.testing.assert_array_equal(np.sort(r.groups, -1), np.sort(np_topk(mixed, K), -1))
  with pytest.raises(ValueError, match="key"):
    a(x, step=0)


@pytest.mark.slow
def test_k_distinct_groups_capacity_and_dropped_fraction():
  cfg_cf = 0.5
  x = inputs()
  ffn = make_ffn(capacity_factor=cfg_cf, dispatch="capacity")
  valid = np.ones((2, 16), bool)
  routing = ffn.route(x)
  groups = np.asarray(routing.groups)
  assert groups.min() >= 0 and groups.max() < E
  assert all(len(set(row)) == K for row in groups.reshape(-1, K))  # exactly k distinct groups per token
  cap = group_capacity(16, E, K, cfg_cf)
  assert cap == math.ceil(cfg_cf * 16 * K / E) == 4
  assert group_capacity(10, E, K, 1.25) == 7  # ceil(6.25)
  assert group_capacity(16, E, K, 100.0) == 16  # a group never needs more slots than the row has tokens
  keep = np_hand_keep(groups, valid, cap)
  for i in range(2):  # no group receives more than its capacity in any row
    counts = np.bincount(groups[i][keep[i]], minlength=E)
    print("row", i, "kept per group:", counts, "capacity", cap)
    assert counts.max() <= cap
  pos = np.asarray(capacity_positions(routing.groups, jnp.asarray(valid), E))
  np.testing.assert_array_equal(pos < cap, keep)
  y, stats = ffn(x)
  hand_dropped = 1.0 - keep.sum() / keep.size
  print("dropped_fraction", float(stats.dropped_fraction), "hand", hand_dropped)
  assert hand_dropped > 0.4  # half the slots have no room
  assert float(stats.dropped_fraction) == pytest.approx(hand_dropped, abs=1e-6)
  ref = np_reference(ffn, x, groups, np_gates(np.asarray(routing.probs, np.float64), groups), keep)
  print("capacity (dropping) vs per-token loop: max err", max_err(y, ref))
  assert max_err(y, ref) < 1e-5
  # Dropless runs every slot.
  y_dl, stats_dl = make_ffn(dispatch="dropless")(x)
  assert float(stats_dl.dropped_fraction) == 0.0
  assert max_err(y_dl, y) > 1e-2


@pytest.mark.parametrize("masked", [False, True])
def test_capacity_equals_dropless_equals_loop(masked):
  x = inputs()
  mask = jnp.ones((2, 16), bool).at[1, 8:].set(False) if masked else None
  valid = np.ones((2, 16), bool) if mask is None else np.asarray(mask)
  ys = {}
  for dispatch, factor in (("capacity", E / K), ("capacity", 100.0), ("dropless", 1.0)):
    y, stats = make_ffn(dispatch=dispatch, capacity_factor=factor)(x, mask=mask)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    assert float(stats.dropped_fraction) == 0.0
    ys[dispatch, factor] = np.asarray(y)
  probs = np_softmax(np_logits(make_ffn(), x))
  groups = np_topk(probs, K)
  keep = np.broadcast_to(valid[..., None], groups.shape)
  ref = np_reference(make_ffn(), x, groups, np_gates(probs, groups), keep)
  print("output scale", np.abs(ref).max())
  for name, y in ys.items():
    print(name, "vs per-token loop: max err", max_err(y, ref))
    assert max_err(y, ref) < 1e-5
  print("capacity vs dropless: max err", max_err(ys["capacity", E / K], ys["dropless", 1.0]))
  assert max_err(ys["capacity", E / K], ys["dropless", 1.0]) < 1e-5


def test_losses_match_numpy():
  x = inputs()
  mask = jnp.ones((2, 16), bool).at[0, 9:].set(False)
  ffn = make_ffn(dispatch="dropless")
  key = jax.random.key(5)
  routing = ffn.route(x, step=30, key=key)
  y, stats = ffn(x, step=30, key=key, mask=mask)
  assert isinstance(stats, RouterStats)
  logits = np_logits(ffn, x)
  print("router logits vs numpy: max err", max_err(routing.logits, logits))
  assert max_err(routing.logits, logits) < 1e-5
  ref = np_stats(logits, np.asarray(routing.groups), np.asarray(mask))
  for name in ("lb_loss", "z_loss", "load", "entropy"):
    print(name, np.asarray(getattr(stats, name)), "numpy", ref[name])
    np.testing.assert_allclose(getattr(stats, name), ref[name], rtol=1e-5, atol=1e-6)
  assert float(np.sum(stats.load)) == pytest.approx(1.0, abs=1e-6)
  assert float(stats.explore) == pytest.approx(0.7)
  graphdef, params = nnx.split(ffn)  # a traced step under jit gives the same result
  y_jit, stats_jit = jax.jit(lambda p, s: nnx.merge(graphdef, p)(x, step=s, key=key, mask=mask))(
      params, jnp.int32(30))
  print("jit with traced step vs eager: max err", max_err(y_jit, y))
  assert max_err(y_jit, y) < 1e-5
  for name in RouterStats._fields:
    np.testing.assert_allclose(getattr(stats_jit, name), getattr(stats, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_mask_padding_excluded(dispatch):
  t = 16
  x = inputs(b=2, t=t)
  mask = np.ones((2, t), bool)
  mask[:, :4] = False  # left padding: would take the first capacity slots if it counted
  garbage = x.at[:, :4].set(50.0 * randn((2, 4, D), 9))
  ffn = make_ffn(dispatch=dispatch, capacity_factor=1.0)
  y1, s1 = ffn(x, mask=jnp.asarray(mask))
  y2, s2 = ffn(garbage, mask=jnp.asarray(mask))
  for name in RouterStats._fields:
    np.testing.assert_allclose(getattr(s1, name), getattr(s2, name), rtol=1e-6, atol=1e-7, err_msg=name)
  print("valid-token output change under padding garbage:", max_err(y1[:, 4:], y2[:, 4:]))
  assert max_err(y1[:, 4:], y2[:, 4:]) < 1e-6
  assert float(np.abs(np.asarray(y2[:, :4])).max()) == 0.0
  logits = np_logits(ffn, x)
  groups = np_topk(np_softmax(logits), K)
  ref = np_stats(logits, groups, mask)
  for name in ("lb_loss", "z_loss", "load", "entropy"):
    np.testing.assert_allclose(getattr(s1, name), ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
  if dispatch == "capacity":
    cap = group_capacity(t, E, K, 1.0)
    keep = np_hand_keep(groups, mask, cap)
    assert not np.array_equal(keep, np_hand_keep(groups, np.ones_like(mask), cap) & mask[..., None])
    hand_dropped = 1.0 - keep.sum() / (mask.sum() * K)
    print("dropped", float(s1.dropped_fraction), "hand", hand_dropped)
    assert float(s1.dropped_fraction) == pytest.approx(hand_dropped, abs=1e-6)
    ref_y = np_reference(ffn, x, groups, np_gates(np_softmax(logits), groups), keep)
    print("masked capacity vs per-token loop: max err", max_err(y1, ref_y))
    assert max_err(y1, ref_y) < 1e-5


def _grads(ffn, x, step, key):
  """Gradients of an output-only loss and of output + aux losses, in one compiled function."""
  graphdef, params = nnx.split(ffn)
  weights = randn(x.shape, 11)

  def loss_fn(params, with_aux):
    y, stats = nnx.merge(graphdef, params)(x, step=step, key=key)
    loss = jnp.sum(y * weights)
    return loss + stats.lb_loss + stats.z_loss if with_aux else loss

  grads = jax.jit(lambda p: (jax.grad(loss_fn)(p, False), jax.grad(loss_fn)(p, True)))(params)
  names = ("router_in", "router_out", "gate_up", "down")
  return [{name: np.asarray(getattr(g, name)[...]) for name in names} for g in grads]


def test_gradients_both_modes():
  x = inputs()
  key = jax.random.key(2)
  by_mode = {}
  for dispatch, factor in (("capacity", E / K), ("capacity", 0.5), ("dropless", 1.0)):
    ffn = make_ffn(dispatch=dispatch, capacity_factor=factor)
    for with_aux, grads in zip((False, True), _grads(ffn, x, step=10, key=key)):
      for name, g in grads.items():
        print(dispatch, factor, "aux" if with_aux else "output-only", name, "|g|max", np.abs(g).max())
        assert np.all(np.isfinite(g)), name
        assert np.abs(g).max() > 1e-6, name  # the router learns through the gates even while exploring
      by_mode[dispatch, factor, with_aux] = grads
  for with_aux in (False, True):
    for name in ("router_in", "router_out", "gate_up", "down"):
      a, b = by_mode["capacity", E / K, with_aux][name], by_mode["dropless", 1.0, with_aux][name]
      print("grad", name, "aux" if with_aux else "output", "capacity vs dropless: max err", max_err(a, b))
      assert max_err(a, b) < 1e-5 * max(1.0, np.abs(a).max())


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_bfloat16_close_to_float32(dispatch):
  x16 = inputs().astype(jnp.bfloat16)
  ffn = make_ffn(dispatch=dispatch, dtype="bfloat16")
  y16, s16 = ffn(x16)
  y32, s32 = ffn(x16.astype(jnp.float32))  # same input values, so the router (float32) chooses the same
  assert y16.dtype == jnp.bfloat16 and s16.lb_loss.dtype == jnp.float32
  np.testing.assert_allclose(s16.load, s32.load, atol=1e-6)
  rel = max_err(y16.astype(jnp.float32), y32) / float(np.abs(np.asarray(y32)).max())
  print(dispatch, "bfloat16 vs float32: max err relative to max |y|", rel)
  assert rel < 3e-2  # bfloat16 has 8 mantissa bits; inputs and weights are rounded, sums accumulate
