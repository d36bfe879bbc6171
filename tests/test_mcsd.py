"""The MCSD block equals the paper's explicit N x N matrix forms, built naively in NumPy (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from yanjax.model.config import ModelConfig
from yanjax.model.layers import BlockInputs
from yanjax.model.mcsd import MCSD, paper_log_rates


def _inputs(segments: np.ndarray) -> BlockInputs:
  """The per-call inputs of rows packed with documents `segments` [b, t] (ids change where one starts)."""
  reset = np.concatenate([np.zeros((len(segments), 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
  t = np.arange(segments.shape[1])
  positions = t - np.maximum.accumulate(np.where(reset, t, 0), axis=1)
  return BlockInputs(jnp.asarray(reset), jnp.asarray(segments, jnp.int32), jnp.asarray(positions, jnp.int32), None)


def _softmax(z):
  z = z - z.max()
  return np.exp(z) / np.exp(z).sum()


def slope_matrix(n, beta, include_current):
  """Paper eq. 4-5: row i holds softmax over the history m < i (m <= i) of -(i - m) beta; row 0 sees itself."""
  w = np.zeros((n, n))
  for i in range(n):
    hist = np.arange(i + 1) if include_current else np.arange(i)
    if hist.size == 0:
      w[i, i] = 1.0
    else:
      w[i, hist] = _softmax(-(i - hist) * beta)
  return w


def decay_matrix(alpha, include_current):
  """Paper eq. 9 with the rate of each token alpha [n]: E'_i = sum_{m < i} (prod_{m < k <= i} alpha_k) E_m
  (m <= i when the current token is included); a fixed alpha gives the paper's alpha^(i - m)."""
  n = len(alpha)
  w = np.zeros((n, n))
  for i in range(n):
    for m in range(i + 1 if include_current else i):
      w[i, m] = np.prod(alpha[m + 1:i + 1])
  return w


def naive_mcsd(block: MCSD, x: np.ndarray, segments: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
  """The block in float64 NumPy, one channel and one document at a time, with explicit matrices; `alpha`
  [b, t, C]: per-token decay rates (default: the block's fixed ones)."""
  cfg = block.cfg
  c, d = cfg.channels, cfg.channel_width
  proj = np.asarray(block.proj[...], np.float64)
  rates = np.exp(np.asarray(block.log_rates(), np.float64))  # [2, c]: g_i, alpha_i
  beta = -np.log(rates[0])
  scale = np.asarray(block.decay_norm.scale[...], np.float64)
  b, t, _ = x.shape
  alpha = np.broadcast_to(rates[1], (b, t, c)) if alpha is None else alpha
  out = np.zeros((b, t, 2, c, d))
  for row in range(b):
    for seg in np.unique(segments[row]):
      idx = np.nonzero(segments[row] == seg)[0]
      xc = x[row, idx].reshape(len(idx), c, d).astype(np.float64)
      for ch in range(c):
        u, v, e, f = (xc[:, ch] @ proj[ch, :, k] for k in range(4))
        v_hist = slope_matrix(len(idx), beta[ch], cfg.include_current) @ v
        e_hist = decay_matrix(alpha[row, idx, ch], cfg.include_current) @ e
        silu = v_hist / (1 + np.exp(-v_hist))
        rms = np.sqrt(np.mean(e_hist ** 2, axis=-1, keepdims=True) + cfg.norm_eps)
        out[row, idx, 0, ch] = silu * u
        out[row, idx, 1, ch] = e_hist / rms * scale[ch] / (1 + np.exp(-f))
  if cfg.combine == "sum":
    return (out[:, :, 0] + out[:, :, 1]).reshape(b, t, c * d)
  return np.einsum("btkcd,kcde->bte", out, np.asarray(block.out[...], np.float64))


def test_paper_rates():
  rates = paper_log_rates(10)
  np.testing.assert_allclose(-rates[0], 2.0 ** (-8.0 * np.arange(1, 11) / 10), rtol=1e-6)
  alpha = np.exp(rates[1].astype(np.float64))
  np.testing.assert_allclose(alpha, 1 - 2.0 ** (-5.0 - np.arange(10)), rtol=1e-6)
  memory = 1 / (1 - alpha)  # ~32 to ~16k tokens, as the paper states for C = 10
  assert round(memory[0]) == 32 and round(memory[-1]) == 16384


@pytest.mark.parametrize("form", ["reference", "associative", "chunked", "pallas"])
@pytest.mark.parametrize("combine,include_current,learnable", [
    ("concat", False, False), ("sum", False, False), ("concat", True, False), ("sum", False, True)])
def test_block_equals_explicit_matrix_form(form, combine, include_current, learnable):
  cfg = ModelConfig(width=24, channels=3, combine=combine, include_current=include_current,
                    learnable_rates=learnable, recurrence=form, chunk_size=4)
  block = MCSD(cfg, rngs=nnx.Rngs(3))
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 13, 24)), np.float32)
  segments = np.array([[1] * 5 + [2] * 6 + [3] * 2, [1] * 13])
  got, _ = block(jnp.asarray(x), _inputs(segments))
  want = naive_mcsd(block, x, segments)
  err = np.max(np.abs(np.asarray(got, np.float64) - want))
  print(f"{form} {combine} include_current={include_current}: max abs err vs N x N form {err:.2e}")
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5)


def test_learnable_rates_start_at_paper_values_and_train():
  cfg = ModelConfig(width=24, channels=3, learnable_rates=True)
  block = MCSD(cfg, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(block.log_rates()), paper_log_rates(3), rtol=1e-5)
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 9, 24))
  inputs = _inputs(np.ones((1, 9), np.int32))
  grads = nnx.grad(lambda m: jnp.sum(m(x, inputs)[0] ** 2))(block)
  g = np.asarray(grads.rate_logits[...])
  assert np.all(np.isfinite(g)) and np.any(g != 0)
