"""Language model: parallel == token-by-token decode, prompt-then-continue == one pass, packed == separate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from yanjax.model.config import ModelConfig
from yanjax.model.lm import LanguageModel

# Max abs logit error for decode and packing equivalences, by compute dtype.
TOLERANCE = {"float32": 2e-5, "bfloat16": 6e-2}

MODELS = {
    "yan": dict(pattern=("mcsd",)),
    "yan_scan_remat": dict(pattern=("mcsd",), scan_layers=True, remat="full", recurrence="chunked", chunk_size=4),
    "yan_sum_current": dict(pattern=("mcsd",), combine="sum", include_current=True, recurrence="associative"),
    "yan_selective": dict(pattern=("mcsd",), router=True, groups=4, top_k=2, dispatch="dropless"),
    "yan_dd_scan_chunked": dict(pattern=("mcsd_dd",), scan_layers=True, recurrence="chunked", chunk_size=4),
    "attention": dict(pattern=("attention",)),
    "attention_scan": dict(pattern=("attention",), scan_layers=True, tie_embeddings=False),
    "hybrid_scan": dict(pattern=("mcsd", "swa"), layers=4, scan_layers=True, window=4),  # 2 repetitions of 2 mixers
}


def _model(name, **changes):
  base = dict(vocab_size=97, width=32, layers=2, channels=4, heads=2, mlp_width=64, max_decode_len=40)
  cfg = ModelConfig(**{**base, **MODELS[name], **changes})
  return LanguageModel(cfg, rngs=nnx.Rngs(0))


forward = nnx.jit(lambda m, *args: m(*args))
prefill = nnx.jit(lambda m, tokens, cache: m.prefill(tokens, cache))


def _tokens(b=2, t=14, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, 97)


def decode_all(model, tokens):
  """Logits [b, t, v] of feeding tokens [b, t] one at a time through decode_step (one jitted scan)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens):
    def one_token(cache, token):  # merged inside the scan body: NNX modules do not cross trace levels
      logits, cache = nnx.merge(graphdef, state, copy=True).decode_step(cache, token)
      return cache, logits

    cache = nnx.merge(graphdef, state).init_cache(tokens.shape[0])
    _, logits = jax.lax.scan(one_token, cache, tokens.T)
    return jnp.swapaxes(logits, 0, 1)

  return run(state, tokens)


def _err(a, b):
  return float(jnp.max(jnp.abs(a - b)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_parallel_equals_token_by_token_decode(name, dtype):
  model = _model(name, dtype=dtype)
  tokens = _tokens()
  logits, _ = forward(model, tokens)
  err = _err(decode_all(model, tokens), logits)
  print(f"{name} {dtype}: parallel vs decode max abs logit err {err:.2e}")
  assert err < TOLERANCE[dtype]


@pytest.mark.parametrize("name", list(MODELS))
def test_prompt_then_continue_equals_one_pass(name):
  model = _model(name)
  tokens = _tokens()
  logits, _ = forward(model, tokens)
  cache = model.init_cache(tokens.shape[0])
  first, cache = prefill(model, tokens[:, :9], cache)
  nxt, cache = prefill(model, tokens[:, 9:10], cache)
  rest, cache = prefill(model, tokens[:, 10:], cache)
  err = _err(jnp.concatenate([first, nxt, rest], 1), logits)
  print(f"{name}: prompt-then-continue max abs logit err {err:.2e}")
  assert err < TOLERANCE["float32"]
  assert np.all(np.asarray(cache.position) == tokens.shape[1])


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_batch_equals_documents_run_one_by_one(name):
  model = _model(name)
  lengths = [5, 7, 4]
  docs = [_tokens(1, n, seed=10 + i) for i, n in enumerate(lengths)]
  packed = jnp.concatenate(docs, axis=1)
  segment_ids = jnp.concatenate([jnp.full((1, n), i + 1, jnp.int32) for i, n in enumerate(lengths)], axis=1)
  positions = jnp.concatenate([jnp.arange(n, dtype=jnp.int32)[None] for n in lengths], axis=1)
  packed_logits, _ = forward(model, packed, segment_ids, positions)
  separate = jnp.concatenate([forward(model, doc)[0] for doc in docs], axis=1)
  err = _err(packed_logits, separate)
  print(f"{name}: packed vs separate max abs logit err {err:.2e}")
  assert err < TOLERANCE["float32"]


def test_later_document_cannot_see_earlier_one():
  """Changing document 1 leaves document 2's logits bit-identical: no state leaks across the boundary."""
  for name in ("yan", "attention"):
    model = _model(name)
    tokens = _tokens(1, 12)
    segment_ids = jnp.array([[1] * 6 + [2] * 6], jnp.int32)
    positions = jnp.array([list(range(6)) * 2], jnp.int32)
    a, _ = forward(model, tokens, segment_ids, positions)
    b, _ = forward(model, tokens.at[:, :6].set(3), segment_ids, positions)
    assert np.array_equal(np.asarray(a[:, 6:]), np.asarray(b[:, 6:])), name


@pytest.mark.slow
def test_router_model_reports_stats_and_aux_loss():
  model = _model("yan_selective", dispatch="capacity")
  logits, aux = model(_tokens(), step=jnp.array(0), key=jax.random.PRNGKey(0))
  load = aux["layer_metrics"]["router_load_group"]
  assert load.shape == (2, 4)  # [layers, groups]
  np.testing.assert_allclose(np.asarray(load.sum(-1)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(aux["layer_metrics"]["router_max_load"], load.max(-1))
  assert {name: v.shape for name, v in aux["layer_metrics"].items() if v.ndim == 1} == {
      "router_max_load": (2,), "router_dropped": (2,), "router_entropy": (2,), "router_explore": (2,)}
  assert float(aux["aux_loss"]) > 0
  assert logits.shape == (2, 14, 97)


@pytest.mark.slow
def test_gradients_are_finite_for_every_model():
  for name in MODELS:
    model = _model(name, dtype="bfloat16")
    tokens = _tokens()

    def loss(m, tokens=tokens):
      logits, aux = m(tokens, step=jnp.array(5), key=jax.random.PRNGKey(0))
      return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux["aux_loss"]

    grads = nnx.jit(nnx.grad(loss))(model)
    leaves = jax.tree.leaves(nnx.state(grads))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), name
    assert all(g.dtype == jnp.float32 for g in leaves), name  # parameters stay float32
