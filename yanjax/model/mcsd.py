"""The MCSD token mixer (multi-channel slope and decay), arXiv 2406.12230 section 2.2.

The width D is split into C channels of Dc features. Per-channel (block-diagonal) projections give U, V, E, F.
  slope: V'_n = sum_{m<n} g^(n-m) V_m / sum_{m<n} g^(n-m),  g = exp(-beta_i), beta_i = 2^(-8 (i+1) / C);
         a document's first token, which has no past, sees itself. Theta_s = SiLU(V') * U.
  decay: E'_n = sum_{m<n} alpha^(n-m) E_m,  alpha_i = 1 - 2^(-5-i).  Theta_d = RMSNorm_Dc(E') * sigmoid(F).
Both are the inclusive recurrence h_n = a h_{n-1} + x_n read one step late (sum_{m<n} a^(n-m) x_m = a h_{n-1}),
so one `linear_recurrence` over the 2C channels [V ; E] serves both, and the decode state is just h and the
number of tokens seen since the last document start (from which the slope normaliser follows in closed form).

Shapes: the legend in docs/model.md. U, V, E, F, g and alpha are the paper's names for values, not sizes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from yanjax.model import layers
from yanjax.model.config import ModelConfig
from yanjax.model.partitioning import Term
from yanjax.model.recurrence import linear_recurrence


class MCSDCache(NamedTuple):
  """Decode state of one MCSD block: O(1) in the sequence length."""
  h: jax.Array  # [b, 2C, Dc] float32: inclusive recurrence states of [V ; E]
  count: jax.Array  # [b] int32: tokens seen since the current document started


def paper_log_rates(channels: int) -> np.ndarray:
  """[2, C] log of the paper's fixed rates: row 0 slope log g_i = -beta_i, row 1 decay log alpha_i."""
  i = np.arange(channels, dtype=np.float64)
  beta = 2.0 ** (-8.0 * (i + 1) / channels)
  alpha = 1.0 - 2.0 ** (-5.0 - i)
  return np.stack([-beta, np.log(alpha)]).astype(np.float32)


def steps_since_reset(reset: jax.Array, count0: jax.Array) -> jax.Array:
  """reset [b, t] bool, count0 [b] tokens before this call -> [b, t] int32 index of each token in its document."""
  t = jnp.arange(reset.shape[1], dtype=jnp.int32)
  last_reset = jax.lax.cummax(jnp.where(reset, t, -1), axis=1)
  return jnp.where(last_reset >= 0, t - last_reset, count0[:, None] + t).astype(jnp.int32)


def slope_normaliser(log_g: jax.Array, k: jax.Array, include_current: bool) -> jax.Array:
  """Sum of the history weights g^j: j = 1..k (strict past) or j = 0..k; log_g [C], k [b, t] -> [b, t, C]."""
  k = k[..., None].astype(jnp.float32)
  geometric = jnp.expm1(k * log_g) / jnp.expm1(log_g)  # sum_{j=0}^{k-1} g^j
  return jnp.exp(log_g) * geometric if not include_current else geometric + jnp.exp(k * log_g)


class MCSD(nnx.Module):
  """MCSD mixer: [b, t, D] -> [b, t, D], with an optional O(1) decode cache."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    ch, dc = cfg.channels, cfg.channel_width
    self.cfg = cfg
    self.proj = layers.param(rngs, (ch, dc, 4, dc), ("channels", "embed", None, None), layers.normal(cfg.init_std))
    self.decay_norm = layers.RMSNorm((ch, dc), ("channels", None), cfg.norm_eps)
    if cfg.combine == "concat":
      self.out = layers.param(rngs, (2, ch, dc, cfg.width), (None, "channels", None, "embed"),
                              layers.normal(cfg.init_std / 2))
    rates = jnp.asarray(paper_log_rates(ch))
    if cfg.learnable_rates:  # parameterised as log(-log a) so that 0 < a < 1 always holds
      self.rate_logits = layers.param(None, (2, ch), (None, "channels"))
      self.rate_logits[...] = jnp.log(-rates)

  def log_rates(self) -> jax.Array:
    """[2, C]: log g (slope) and log alpha (decay)."""
    if self.cfg.learnable_rates:
      return -jnp.exp(self.rate_logits[...])
    return jnp.asarray(paper_log_rates(self.cfg.channels))

  def recurrence_log_rates(self, xc: jax.Array) -> jax.Array:
    """The rates of the 2C recurrence channels [V ; E] for inputs xc [b, t, C, Dc]: here fixed, [2C]; a subclass
    may return per-token rates [b, t, 2C] (yanjax/model/mcsd_dd.py)."""
    return self.log_rates().reshape(2 * self.cfg.channels)

  def init_cache(self, batch: int, dtype) -> MCSDCache:
    """The state before any token; float32 whatever the compute `dtype`."""
    ch, dc = self.cfg.channels, self.cfg.channel_width
    return MCSDCache(jnp.zeros((batch, 2 * ch, dc), jnp.float32), jnp.zeros((batch,), jnp.int32))

  def __call__(self, x: jax.Array, inputs: layers.BlockInputs, cache: MCSDCache | None = None
               ) -> tuple[jax.Array, MCSDCache]:
    """x [b, t, D] in compute dtype -> (y [b, t, D], cache after x); documents start at `inputs.reset`."""
    cfg = self.cfg
    b, t, _ = x.shape
    ch, dc = cfg.channels, cfg.channel_width
    reset = inputs.reset
    if cache is None:
      cache = self.init_cache(b, x.dtype)
    xc = x.reshape(b, t, ch, dc)
    u, v, e, f = jnp.unstack(jnp.einsum("btcd,cdke->kbtce", xc, layers.cast(self.proj[...], x.dtype)))
    log_a = self.recurrence_log_rates(xc)  # [2C] or [b, t, 2C]
    h, h_last = linear_recurrence(jnp.concatenate([v, e], axis=2), log_a, reset, cache.h,
                                  form=cfg.recurrence, chunk_size=cfg.chunk_size)
    if cfg.include_current:
      history = h
    else:  # sum_{m<n} a^(n-m) x_m = a * h_{n-1} (a: the current token's rate), and nothing at a document start
      previous = jnp.concatenate([cache.h[:, None], h[:, :-1]], axis=1)
      history = jnp.where(reset[..., None, None], 0.0, jnp.exp(log_a)[..., None] * previous)
    k = steps_since_reset(reset, cache.count)
    z = slope_normaliser(self.log_rates()[0], k, cfg.include_current)[..., None]  # [b, t, C, 1]
    v32 = v.astype(jnp.float32)
    v_hist = jnp.where(z > 0, history[:, :, :ch] / jnp.where(z > 0, z, 1.0), v32)
    theta_s = jax.nn.silu(v_hist) * u.astype(jnp.float32)
    theta_d = self.decay_norm(history[:, :, ch:]) * jax.nn.sigmoid(f.astype(jnp.float32))
    if cfg.combine == "concat":
      y = jnp.einsum("kbtcd,kcde->bte", jnp.stack([theta_s, theta_d]).astype(x.dtype),
                     layers.cast(self.out[...], x.dtype))
    else:
      y = (theta_s + theta_d).reshape(b, t, cfg.width).astype(x.dtype)
    return y, MCSDCache(h_last, k[:, -1] + 1)

  @staticmethod
  def residual_terms(cfg: ModelConfig, t: int, itemsize: int) -> list[Term]:
    """What autodiff keeps of one block for its backward without remat, per token (yanjax.training.plan; `t` unused:
    linear in the sequence)."""
    shape, axes = (cfg.channels, cfg.channel_width), ("channels", None)
    return [Term("MCSD recurrence and gates (float32)", shape, axes, 4, 10),
            Term("MCSD projections, output", shape, axes, itemsize, 2)]

  @staticmethod
  def backward_terms(cfg: ModelConfig, t: int) -> list[Term]:
    """What its backward holds beyond the residuals, per token: nothing."""
    return []
