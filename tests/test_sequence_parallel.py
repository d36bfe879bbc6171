"""Sequence parallelism (the mesh axis `sequence` splits time over devices) against one device, on the 8 simulated
CPU devices: the recurrence's outputs, final states and gradients in every form; every mixer's outputs, final
states and gradients; the trainer's losses and parameters over a few steps (hybrid, selective); packed documents
whose boundaries fall inside and on the segments' edges. Configuration errors: a split that does not divide the
sequence, cuDNN attention on a split sequence."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import REPO, _batch

from yanjax.core.config import ConfigError, load_config_file
from yanjax.model.config import ModelConfig
from yanjax.model.layers import BlockInputs
from yanjax.model.mixers import MIXERS
from yanjax.model.recurrence import FORMS, linear_recurrence
from yanjax.model.selective import SelectiveFFN
from yanjax.training import sharding
from yanjax.training.run_config import DEFAULTS
from yanjax.training.trainer import build_trainer

RULES = {name: tuple(axes) for name, axes in DEFAULTS["rules"]}
# sequence alone, and with data and fsdp (the 8 devices at most)
MESHES = [{"sequence": 2}, {"sequence": 8}, {"data": 2, "sequence": 4}, {"fsdp": 2, "sequence": 4}]


def _mesh(axes):
  return sharding.make_mesh(axes, jax.devices()[:int(np.prod(list(axes.values())))])


def _split(fn, axes):
  """fn jitted under the activation rules of the mesh `axes` (what the trainer compiles)."""
  return jax.jit(sharding.with_activation_rules(fn, _mesh(axes), RULES))


def _max_error(got, want):
  """The largest absolute difference of any leaf, relative to that leaf's largest value (or 1: a scalar loss that
  sums terms of both signs is compared in absolute terms)."""
  return max(float(jnp.max(jnp.abs(g - w)) / jnp.maximum(jnp.max(jnp.abs(w)), 1.0))
             for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))


def _resets(b, t):
  """[b, t] document starts: row 0 on the segments' edges of every split (t / 2, t / 4), row 1 inside them."""
  reset = np.zeros((b, t), bool)
  reset[0, [t // 4, t // 2]] = True
  reset[1, [3, t // 2 + 1]] = True
  return jnp.asarray(reset)


@pytest.mark.parametrize("form", FORMS)
def test_recurrence_split_over_time_equals_one_device(form):
  """h, the final state and the gradients (x, per-token rates, the initial state) of each form with time over
  2 and 8 devices, and 4 beside fsdp=2."""
  b, t, c, d = 2, 48, 4, 4
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(keys[0], (b, t, c, d))
  log_a = -jnp.exp(jax.random.normal(keys[1], (b, t, c)))
  h0 = jax.random.normal(keys[2], (b, c, d))
  reset = _resets(b, t)

  def loss(x, log_a, h0):
    h, last = linear_recurrence(x, log_a, reset, h0, form=form, chunk_size=8)
    return jnp.sum(h * x) + jnp.sum(jnp.sin(last)), (h, last)

  grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
  want = jax.jit(grads)(x, log_a, h0)
  for axes in MESHES[:2] + MESHES[3:]:
    err = _max_error(_split(grads, axes)(x, log_a, h0), want)
    print(form, axes, f"max rel err {err:.2e}")
    assert err < 1e-5


def test_a_long_segment_carries_the_slowest_decay_within_float32_rounding():
  """Two segments of 32,768 positions (the decay from a segment's start is exp of a cumulative sum that long) at
  the paper's slowest and fastest decay rates for C = 10: h equals one device's chunked scan."""
  t, channels = 2 ** 16, 2
  log_a = jnp.log(jnp.array([1 - 2.0 ** -14, 1 - 2.0 ** -5], jnp.float32))
  x = jax.random.normal(jax.random.PRNGKey(3), (1, t, channels, 2))
  reset = jnp.zeros((1, t), bool).at[0, 40_000].set(True)

  def run(x):
    return linear_recurrence(x, log_a, reset, form="chunked", chunk_size=64)

  err = _max_error(_split(run, {"sequence": 2})(x), jax.jit(run)(x))
  print(f"t = 2^16 over 2 devices: max rel err {err:.2e}")
  assert err < 1e-5


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_selective_dispatch_runs_each_devices_tokens(dispatch):
  """Time over 4 devices, each dispatching its own tokens. Dropless: one device's outputs and gradients. Capacity
  (a tight factor, so tokens drop): each device queues its segment of a row on its own with the capacity of its
  t / 4 tokens, which is one device running the segments as rows of their own."""
  cfg = ModelConfig(vocab_size=50, width=32, layers=1, channels=4, mlp_width=64, router=True, groups=4, top_k=2,
                    dispatch=dispatch, capacity_factor=0.75)
  graphdef, params = nnx.split(SelectiveFFN(cfg, rngs=nnx.Rngs(0)))
  b, t, s = 2, 32, 4
  x = jax.random.normal(jax.random.PRNGKey(4), (b, t, cfg.width))
  weights = jax.random.normal(jax.random.PRNGKey(5), (b, t, cfg.width))

  def as_segments(a):  # [b, t, D] <-> [S b, t / S, D] when dropped tokens depend on the segments
    return jnp.swapaxes(a.reshape(b, s, t // s, -1), 0, 1).reshape(s * b, t // s, -1)

  def as_rows(a):
    return jnp.swapaxes(a.reshape(s, b, t // s, -1), 0, 1).reshape(b, t, -1)

  def loss(params, x, by_segment):
    y, stats = nnx.merge(graphdef, params)(as_segments(x) if by_segment else x)
    y = as_rows(y) if by_segment else y
    return jnp.sum(y * weights), (y, stats.dropped_fraction)

  grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  want = jax.jit(grads, static_argnums=2)(params, x, dispatch == "capacity")
  got = _split(lambda p, x: grads(p, x, False), {"sequence": 4})(params, x)
  print(dispatch, "dropped", float(want[0][1][1]), float(got[0][1][1]))
  assert (float(want[0][1][1]) > 0) == (dispatch == "capacity")
  err = _max_error(got, want)
  print(dispatch, f"max rel err {err:.2e}")
  assert err < 1e-5


# Sliding-window attention with W = 6 runs each device's segment (>= W tokens) in blocks, the neighbour's last W keys
# moved to it; with W = 16, segments of 12 and 6 tokens are shorter than the window: the keys are gathered.
MIXER_CASES = [(name, 6) for name in MIXERS] + [("swa", 16)]


@pytest.mark.parametrize("name,window", MIXER_CASES)
def test_every_mixer_split_over_time_equals_one_device(name, window):
  """y, the final state (MCSD's h and count) and the gradients (input, parameters) of each mixer on packed rows of
  48 tokens with time over 2 and 8 devices, and 4 beside data=2."""
  cfg = ModelConfig(pattern=(name,), vocab_size=50, width=32, layers=1, channels=4, heads=2, mlp_width=64,
                    window=window, recurrence="chunked", chunk_size=4)
  graphdef, params = nnx.split(MIXERS[name](cfg, rngs=nnx.Rngs(0)))
  b, t = 4, 48
  x = jax.random.normal(jax.random.PRNGKey(1), (b, t, cfg.width))
  segment_ids = jnp.cumsum(_resets(b, t).at[:, 0].set(True), axis=1).astype(jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # RoPE's: any positions serve
  reset = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
  inputs = BlockInputs(reset, segment_ids, positions, None)
  weights = jax.random.normal(jax.random.PRNGKey(2), (b, t, cfg.width))

  def loss(params, x):
    y, cache = nnx.merge(graphdef, params)(x, inputs)
    state = [] if cache is None else jax.tree.leaves(cache)
    return jnp.sum(y * weights) + sum(jnp.sum(jnp.sin(s.astype(jnp.float32))) for s in state), (y, cache)

  grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  want = jax.jit(grads)(params, x)
  for axes in MESHES[:3]:
    err = _max_error(_split(grads, axes)(params, x), want)
    print(name, axes, f"max rel err {err:.2e}")
    assert err < 1e-5


def _trainer(mesh_axes, model, loss_chunk=0):
  cfg = load_config_file(REPO / "configs/yan_tiny.py")
  cfg.model.update(model)
  cfg.mesh.update(mesh_axes)
  cfg.train.loss_chunk = loss_chunk
  trainer = build_trainer(cfg, jax.devices()[:int(np.prod(list(cfg.mesh.values())))])
  return trainer.init(), trainer


# The hybrid's three mixers, the selective FFN (dropless: each device's tokens through their groups), per-token
# decay rates (mcsd_dd); W = 4 < t / S: each device's sliding-window blocks need the neighbour's last keys; the
# layers scanned and rematerialised as the paper sizes ship.
HYBRID = dict(vocab_size=512, width=32, channels=2, mlp_width=64, layers=4, heads=2, window=4,
              pattern=("mcsd", "swa", "mcsd_dd", "attention"), router=True, groups=4, top_k=2, dispatch="dropless",
              explore_steps=2, scan_layers=True, remat="save_dots")


@pytest.mark.slow
def test_training_split_over_time_equals_one_device():
  """Three steps of a scanned hybrid selective model on fsdp=2 x sequence=2 x tensor=2 (data with sequence: the
  resumed run of tests/test_resume_topology.py; the hybrid sharded without a split is this test with sequence=1):
  losses and parameters equal one device's, on batches of two documents (9 + 8
  tokens: a boundary inside a segment) with the loss chunked within each segment (3 of its 8 positions at a time,
  the last chunk padded; one device: the whole logits)."""
  state, single = _trainer({"data": 1}, HYBRID, loss_chunk=0)
  losses = []
  for i in range(3):
    state, metrics = single.train_step(state, _batch(i))
    losses.append(float(metrics["loss"]))
  params = jax.tree.leaves(state["params"])
  state, split = _trainer({"data": 1, "fsdp": 2, "sequence": 2, "tensor": 2}, HYBRID, loss_chunk=3)
  assert split.batch_sharding.spec[1] == "sequence"
  for i in range(3):
    state, metrics = split.train_step(state, _batch(i))
    print(i, losses[i], float(metrics["loss"]))
    np.testing.assert_allclose(float(metrics["loss"]), losses[i], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state["params"]), params, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_a_split_that_does_not_divide_the_sequence_or_needs_whole_sequences_is_refused():
  with pytest.raises(ConfigError, match=re.escape("mesh.sequence=3: must divide train.seq_len=128 "
                                                  "(each device takes seq_len / sequence positions)")):
    _trainer({"data": 1, "sequence": 3}, dict(vocab_size=512, width=32, channels=2, mlp_width=64, layers=1))
  cfg = load_config_file(REPO / "configs/yan_tiny.py")
  cfg.mesh.update(data=1, sequence=-1)  # the devices fill it: 3
  with pytest.raises(ConfigError, match=re.escape("train.seq_len=128 does not divide over the 3 devices of the length "
                                                  "mesh axes ('sequence',); use a multiple of 3 or change")):
    build_trainer(cfg, jax.devices()[:3])
  cfg = load_config_file(REPO / "configs/yan_tiny.py")
  cfg.model.update(pattern=("attention",), heads=2, attention_kernel="cudnn", dtype="bfloat16")
  cfg.mesh.update(sequence=2)
  with pytest.raises(ConfigError, match=re.escape("model.attention_kernel='cudnn': cuDNN flash attention takes whole "
                                                  "sequences, and mesh.sequence splits them")):
    build_trainer(cfg, jax.devices()[:2])
