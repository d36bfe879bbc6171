"""Sliding-window attention: the parallel form equals the ring-buffer cache fed in chunks, packed documents equal
separate ones, a key influences exactly the W queries from its row on, the blocked form equals the dense one, the
NumPy twin equals the JAX mixer, its state does not grow, and the edge windows (1, and >= t: full attention)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import random_model

from yanjax.model.attention import Attention
from yanjax.model.config import ModelConfig
from yanjax.model.layers import BlockInputs
from yanjax.model.swa import Keys, SlidingWindowAttention, blocked_attention, dense_attention, window_attention
from yanjax.numpy_runtime import layers as np_layers
from yanjax.numpy_runtime.format import check_config
from yanjax.numpy_runtime.swa import SlidingWindowAttention as Twin

B, T = 2, 12  # T > 2W for W = 4: the mixer's blocked form, and a ring that wraps
# Jitted: one small program per shape compiles faster than the eager calls' many one-op programs.
_call = nnx.jit(lambda mixer, x, inputs, cache=None: mixer(x, inputs, cache))


def _config(**changes):
  """Every config of these tests."""
  return ModelConfig(**{**dict(pattern=("swa",), vocab_size=50, width=32, layers=2, heads=2, mlp_width=64, window=4,
                               init_std=0.5), **changes})


def _mixer(**changes):
  return SlidingWindowAttention(_config(**changes), rngs=nnx.Rngs(0))


def _twin(mixer):
  weights = {".".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(mixer))}
  return Twin(check_config(mixer.cfg.to_dict()), weights)


def _x():
  return jax.random.normal(jax.random.PRNGKey(1), (B, T, 32))


def _inputs(segment_ids, offset=0, twin=False):
  """BlockInputs (NumPy's for the twin) of segment_ids [b, t], positions counted in each segment from `offset`."""
  segment_ids = np.asarray(segment_ids, np.int32)
  t = segment_ids.shape[1]
  reset = np.concatenate([np.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  start = np.maximum.accumulate(np.where(reset, np.arange(t), 0), axis=1)
  positions = (offset + np.arange(t) - start).astype(np.int32)
  if twin:
    return np_layers.BlockInputs(reset, segment_ids, positions)
  return BlockInputs(*map(jnp.asarray, (reset, segment_ids, positions)), None)


def _chunked(mixer, x, sizes, twin=False):
  """y [b, t, D] of x [b, t, D] (one document per row) fed through the mixer's decode state in chunks of `sizes`."""
  state = mixer.init_state(x.shape[0]) if twin else mixer.init_cache(x.shape[0], jnp.float32)
  run, ys, start = mixer if twin else partial(_call, mixer), [], 0
  for size in sizes:
    y, state = run(x[:, start:start + size], _inputs(np.ones((x.shape[0], size)), start, twin), state)
    ys.append(np.asarray(y))
    start += size
  return np.concatenate(ys, axis=1)


def _error(a, b):
  """Max abs difference over max |b|, printed."""
  error = float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
  print(f"max abs diff / max |y| = {error:.1e}")
  return error


CHUNKS = {"decode": [1] * T, "prompt_6_then_decode": [6] + [1] * 6, "prompt_10_blocked": [10, 2],
          "3_then_9_blocked": [3, 9]}


@pytest.mark.parametrize("sizes", list(CHUNKS.values()), ids=list(CHUNKS))
def test_parallel_form_equals_the_ring_cache_fed_in_chunks(sizes):
  mixer, x = _mixer(), _x()
  y, _ = _call(mixer, x, _inputs(np.ones((B, T))))
  assert _error(_chunked(mixer, x, sizes), y) < 1e-5


@pytest.mark.parametrize("window", [4, 8])  # T = 12: blocked, dense
def test_packed_documents_equal_separate_ones(window):
  mixer, x = _mixer(window=window), _x()
  segment_ids = np.array([[1] * 5 + [2] * 5 + [0] * 2] * B)
  y, _ = _call(mixer, x, _inputs(segment_ids))
  alone = [_call(mixer, x[:, s], _inputs(np.ones((B, 5))))[0] for s in (slice(0, 5), slice(5, 10))]
  assert _error(y[:, :10], jnp.concatenate(alone, axis=1)) < 1e-5


@pytest.mark.parametrize("window", [4, 6])  # T = 12: blocked, dense
def test_a_key_influences_exactly_the_w_queries_from_its_row_on(window):
  mixer, x, inputs, row = _mixer(window=window), _x(), _inputs(np.ones((B, T))), 3
  y, _ = _call(mixer, x, inputs)
  y_perturbed, _ = _call(mixer, x.at[:, row].add(3.0), inputs)
  changed = np.any(np.abs(np.asarray(y_perturbed - y)) > 1e-6, axis=(0, 2))
  print(np.flatnonzero(changed))
  np.testing.assert_array_equal(np.flatnonzero(changed), np.arange(row, row + window))


def test_blocked_form_equals_dense_form():
  """Outputs and gradients: packed segments, t not a multiple of W, with no rows before and with W rows before
  (one of them unseen)."""
  t, window = 13, 4
  q, k, v, cotangent = jax.random.normal(jax.random.PRNGKey(2), (4, B, t + window, 2, 8))
  segment = jnp.asarray(np.array([[1] * 6 + [2] * 7] * B), jnp.int32)
  new = Keys(k[:, window:], v[:, window:], jnp.broadcast_to(jnp.arange(t), (B, t)), segment)
  before = Keys(k[:, :window], v[:, :window], jnp.broadcast_to(jnp.arange(-window, 0), (B, window)),
                jnp.asarray([[1, 1, 0, 1]] * B, jnp.int32))

  @jax.jit
  def forms(q, new, before):  # (output, gradients) of blocked, dense, blocked after `before`, dense after it
    def run(form, q, k, v):
      keys = new._replace(k=k, v=v)
      if form == "blocked":
        return window_attention(q, keys, window)
      if form == "blocked_after":
        return blocked_attention(q, keys, before, window)
      both = keys if form == "dense" else Keys(*(jnp.concatenate(pair, axis=1) for pair in zip(before, keys)))
      return dense_attention(q, keys.index, keys.segment, both, window)
    results = {}
    for form in ("blocked", "dense", "blocked_after", "dense_after"):
      y, vjp = jax.vjp(partial(run, form), q, new.k, new.v)
      results[form] = (y, *vjp(cotangent[:, window:]))
    return results

  results = forms(q[:, window:], new, before)
  for blocked, dense in (("blocked", "dense"), ("blocked_after", "dense_after")):
    assert max(_error(a, b) for a, b in zip(results[blocked], results[dense])) < 1e-6
  assert _error(results["blocked_after"][0], results["dense"][0]) > 1e-3  # the rows before are seen


def test_the_twin_equals_the_mixer_and_its_state_does_not_grow():
  mixer, x = _mixer(), _x()
  twin, x_np = _twin(mixer), np.asarray(x)
  segment_ids = np.array([[1] * 5 + [2] * 7, [1] * 9 + [2] * 3])
  y, _ = _call(mixer, x, _inputs(segment_ids))
  y_np, _ = twin(x_np, _inputs(segment_ids, twin=True))
  assert _error(y_np, y) < 1e-5
  for sizes in ([1] * T, [6] + [1] * 6, [3, 9]):
    assert _error(_chunked(twin, x_np, sizes, twin=True), _chunked(mixer, x, sizes)) < 1e-5
  shapes = []
  for t in (1, 3 * mixer.cfg.window):
    ones = np.ones((B, t))
    _, state = twin(x_np[:, :t], _inputs(ones, twin=True), twin.init_state(B, max_len=1))
    _, cache = _call(mixer, x[:, :t], _inputs(ones), mixer.init_cache(B, jnp.float32))
    shapes.append([a.shape for a in (*state[:2], *cache)])
  assert shapes[0] == shapes[1]


def test_window_one_sees_only_its_own_token():
  mixer, x, inputs = _mixer(window=1), _x(), _inputs(np.ones((B, T)))
  y, _ = _call(mixer, x, inputs)
  assert _error(y, mixer.project_out(mixer.project_in(x, inputs.positions)[2])) < 1e-6


def test_a_window_as_long_as_the_sequence_is_full_causal_attention():
  mixer, x = _mixer(window=T), _x()
  attention = Attention(mixer.cfg, rngs=nnx.Rngs(1))
  nnx.update(attention, nnx.state(mixer, nnx.Param))
  inputs = _inputs(np.array([[1] * 5 + [2] * 7] * B))
  assert _error(_call(mixer, x, inputs)[0], _call(attention, x, inputs)[0]) < 1e-6


def test_the_facts_from_the_config():
  c = _config().to_dict()
  assert Twin.check({**c, "window": 0}) == ("window", "must be a positive integer")
  assert Twin.check({**c, "heads": 3})[0] == "heads"  # attention's checks
  assert Twin.mixing_flops(c, 3) == 12 * 3 * 32 and Twin.mixing_flops(c, 1000) == 12 * 4 * 32
  assert Twin.max_context(c) is None and _config().max_context is None
  assert Twin.summary(c) == "swa H=2 W=4"
  for t, keys in ((5, 5), (1000, 8)):  # dense, blocked (2W keys a query)
    terms = SlidingWindowAttention.residual_terms(_config(), t, 2)
    assert [term.dims for term in terms if "logits" in term.what] == [(2, keys)]


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_language_model_decodes_past_the_window_as_one_pass(dtype, tolerance):
  """Scanned layers (the ring caches stacked over L): one pass == a prompt of 6 tokens, then decode steps."""
  model = random_model(_config(scan_layers=True, dtype=dtype))
  tokens = jax.random.randint(jax.random.PRNGKey(3), (B, 11), 0, 50)
  logits, _ = nnx.jit(lambda m, tokens: m(tokens))(model, tokens)
  prefill = nnx.jit(lambda m, tokens, cache: m.prefill(tokens, cache))
  decode = nnx.jit(lambda m, cache, token: m.decode_step(cache, token))
  prompt_logits, cache = prefill(model, tokens[:, :6], model.init_cache(B))
  steps = [prompt_logits]
  for i in range(6, 11):
    step_logits, cache = decode(model, cache, tokens[:, i])
    steps.append(step_logits[:, None])
  assert _error(jnp.concatenate(steps, axis=1), logits) < tolerance
