"""MCSD with data-dependent decay (mixer "mcsd_dd"): the block equals its explicit float64 matrix form, every
recurrence form agrees, parallel == token-by-token decode, packed == separate, a zero gate is MCSD itself, and
the gate trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_mcsd import _inputs, naive_mcsd

from yanjax.model.config import ModelConfig
from yanjax.model.mcsd import MCSD
from yanjax.model.mcsd_dd import MCSDDataDecay

FORMS = ["reference", "associative", "chunked", "pallas"]
# Token-by-token decode, packing and the gate's gradients run the Pallas kernel interpreted at every call (~12 s a
# test on 2 cores): its resets, continuation from a state and gradients with per-token rates are checked in
# tests/test_recurrence.py instead.
UNINTERPRETED_FORMS = FORMS[:3]
SEGMENTS = np.array([[1] * 5 + [2] * 6 + [3] * 2, [1] * 13])  # row 0 packs three documents


def _block(seed=3, gate_std=0.5, **changes):
  """A block of width 24 (C = 3, Dc = 8) whose gate is large enough to move the rates by O(1) factors."""
  cfg = ModelConfig(**{"width": 24, "channels": 3, "chunk_size": 4, **changes})
  block = MCSDDataDecay(cfg, rngs=nnx.Rngs(seed))
  block.rate_gate[...] = gate_std * jax.random.normal(jax.random.PRNGKey(seed), block.rate_gate[...].shape)
  return block


def _x(b=2, t=13, seed=0):
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (b, t, 24)), np.float32)


def per_token_alpha(block: MCSDDataDecay, x: np.ndarray) -> np.ndarray:
  """alpha_{n,i} = alpha_i ** softplus(w_i . x_{n,i} + log(e - 1)), [b, t, C], in float64."""
  cfg = block.cfg
  xc = x.reshape(*x.shape[:2], cfg.channels, cfg.channel_width).astype(np.float64)
  gate = np.einsum("btcd,cd->btc", xc, np.asarray(block.rate_gate[...], np.float64)) + np.log(np.e - 1)
  return np.exp(np.asarray(block.log_rates(), np.float64)[1]) ** np.logaddexp(gate, 0.0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("combine,include_current,learnable", [
    ("concat", False, False), ("sum", False, False), ("concat", True, False), ("sum", False, True)])
def test_block_equals_explicit_matrix_form(form, combine, include_current, learnable):
  block = _block(combine=combine, include_current=include_current, learnable_rates=learnable, recurrence=form)
  x = _x()
  alpha = per_token_alpha(block, x)
  assert 0.1 < alpha.min() / alpha.max() and alpha.std(axis=1).min() > 0  # the gate moves the rates per token
  got, _ = block(jnp.asarray(x), _inputs(SEGMENTS))
  want = naive_mcsd(block, x, SEGMENTS, alpha)
  print(f"{form} {combine} include_current={include_current} learnable={learnable}: max abs err vs N x N form "
        f"{np.max(np.abs(np.asarray(got, np.float64) - want)):.2e}")
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("form", UNINTERPRETED_FORMS)
def test_parallel_equals_token_by_token_decode(form):
  block = _block(recurrence=form)
  x = jnp.asarray(_x(t=11))
  ones = np.ones((2, 11), np.int32)
  y, cache = block(x, _inputs(ones), block.init_cache(2, jnp.float32))
  step_cache, steps = block.init_cache(2, jnp.float32), []
  for n in range(11):
    y_n, step_cache = block(x[:, n:n + 1], _inputs(ones[:, :1]), step_cache)
    steps.append(y_n)
  err = float(jnp.max(jnp.abs(jnp.concatenate(steps, 1) - y)))
  err_h = float(jnp.max(jnp.abs(step_cache.h - cache.h)))
  print(f"{form}: parallel vs decode max abs err: outputs {err:.2e}, final state {err_h:.2e}")
  assert err < 1e-5 and err_h < 1e-4 * float(jnp.max(jnp.abs(cache.h)))
  assert np.array_equal(np.asarray(step_cache.count), np.asarray(cache.count)) and int(cache.count[0]) == 11


@pytest.mark.parametrize("form", UNINTERPRETED_FORMS)
def test_packed_documents_equal_documents_run_separately(form):
  block = _block(recurrence=form)
  x = jnp.asarray(_x(b=1))
  packed, _ = block(x, _inputs(SEGMENTS[:1]))
  bounds = np.cumsum([0, 5, 6, 2])
  separate = jnp.concatenate([block(x[:, s:e], _inputs(np.ones((1, e - s), np.int32)))[0]
                              for s, e in zip(bounds[:-1], bounds[1:])], axis=1)
  err = float(jnp.max(jnp.abs(packed - separate)))
  print(f"{form}: packed vs separate max abs err {err:.2e}")
  assert err < 1e-5


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("include_current,learnable", [(False, False), (True, True)])
def test_zero_gate_is_mcsd(form, include_current, learnable):
  """rate_gate = 0: the multiplier is softplus(log(e - 1)) = 1, so the block is MCSD with the same parameters."""
  block = _block(gate_std=0.0, recurrence=form, include_current=include_current, learnable_rates=learnable)
  mcsd = MCSD(block.cfg, rngs=nnx.Rngs(7))
  _, _, shared = nnx.split(block, nnx.PathContains("rate_gate"), ...)
  nnx.update(mcsd, shared)  # MCSD's parameters are the block's, less rate_gate
  assert not hasattr(mcsd, "rate_gate") and np.array_equal(mcsd.proj[...], block.proj[...])
  x, inputs = jnp.asarray(_x()), _inputs(SEGMENTS)
  np.testing.assert_allclose(np.asarray(block.recurrence_log_rates(x.reshape(2, 13, 3, 8))),
                             np.broadcast_to(np.asarray(mcsd.recurrence_log_rates(None)), (2, 13, 6)), rtol=1e-6)
  err = float(jnp.max(jnp.abs(block(x, inputs)[0] - mcsd(x, inputs)[0])))
  print(f"{form} include_current={include_current} learnable={learnable}: zero gate vs MCSD max abs err {err:.2e}")
  assert err < 1e-6


@pytest.mark.slow
def test_gradients_reach_the_gate_and_agree_across_forms():
  x, inputs = jnp.asarray(_x()), _inputs(SEGMENTS)
  grads = {}
  for form in UNINTERPRETED_FORMS:  # the kernel's gradients with per-token rates: tests/test_recurrence.py
    block = _block(recurrence=form, learnable_rates=True)
    grads[form] = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, inputs)[0] ** 2)))(block)
  for name in ("rate_gate", "rate_logits"):
    ref = np.asarray(getattr(grads["reference"], name)[...])
    assert np.all(np.isfinite(ref)) and np.all(ref != 0), name
    for form in UNINTERPRETED_FORMS[1:]:
      err = np.max(np.abs(np.asarray(getattr(grads[form], name)[...]) - ref)) / np.max(np.abs(ref))
      print(f"{form} grad {name}: max rel err vs reference {err:.2e}")
      assert err < 1e-4, (form, name)
