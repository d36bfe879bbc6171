"""The MCSD mixer in NumPy, and what yanjax knows about it from the config alone (registered in mixers.py).

The runtime runs the recurrence token by token (the O(1) decode form), so a whole sequence is the decode loop
run over it; docs/export.md lists its steps in this order. The JAX model is yanjax/model/mcsd.py.

Shapes: the legend in docs/model.md. U, V, E, F, g and alpha are the paper's names for values, not sizes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .layers import F32, BlockInputs, rms_norm, sigmoid, silu

COMBINES = ("concat", "sum")  # model.combine: [slope; decay] through an output projection (eq. 13), or added (eq. 20)

class MCSDState(NamedTuple):
  h: np.ndarray  # [b, 2C, Dc] float32: recurrence states of [V ; E] (V channels first)
  count: np.ndarray  # [b] int: tokens seen since the document started


def paper_log_rates(channels: int) -> np.ndarray:
  """[2, C] fixed log rates, computed in float64 then rounded to float32: row 0 slope log g_i = -beta_i,
  beta_i = 2^(-8 (i+1) / C); row 1 decay log alpha_i, alpha_i = 1 - 2^(-5-i)."""
  i = np.arange(channels, dtype=np.float64)
  return np.stack([-(2.0 ** (-8.0 * (i + 1) / channels)), np.log(1.0 - 2.0 ** (-5.0 - i))]).astype(F32)


class MCSD:
  """MCSD mixer of one layer: x [b, t, D] -> y [b, t, D], with an O(1) state. Static methods: its facts, from
  the config `c` (the mapping `format.check_config` returns)."""

  @staticmethod
  def check(c: dict[str, Any]) -> tuple[str, str] | None:
    """(config key, why) of the first value this mixer cannot run with, or None."""
    if c["width"] % c["channels"]:
      return "channels", f"width {c['width']} must be divisible by channels"
    return None

  @staticmethod
  def check_training(c: dict[str, Any], seq_len: int) -> tuple[str, str] | None:
    """(config key, why) of a value this mixer cannot train with on sequences of `seq_len`, or None."""
    return None

  @staticmethod
  def shapes(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Its arrays (export names after `blocks.{i}.mixer.`) -> shape, in canonical order."""
    ch, dc = c["channels"], c["width"] // c["channels"]
    shapes = {"proj": (ch, dc, 4, dc)}  # per-channel projections to U, V, E, F
    if c["learnable_rates"]:
      shapes["rate_logits"] = (2, ch)  # log(-log rate); row 0 slope, row 1 decay
    shapes["decay_norm.scale"] = (ch, dc)
    if c["combine"] == "concat":
      shapes["out"] = (2, ch, dc, c["width"])  # output projection of [Theta_s ; Theta_d]
    return shapes

  @staticmethod
  def params(c: dict[str, Any]) -> tuple[int, int]:
    """(all parameters, those in matmuls) of one layer: 4 C Dc^2 (U, V, E, F; block-diagonal) + 2 D^2 (concat
    output projection; none for combine="sum") in matmuls, + D (decay RMSNorm) + 2 C (learnable rates)."""
    d = c["width"]
    matmul = 4 * c["channels"] * (d // c["channels"]) ** 2 + (2 * d * d if c["combine"] == "concat" else 0)
    return matmul + d + (2 * c["channels"] if c["learnable_rates"] else 0), matmul

  @staticmethod
  def mixing_flops(c: dict[str, Any], seq_len: int) -> int:
    """Training FLOPs per token of one layer's sequence mixing outside its weights: 12 (2D), the recurrence over
    the 2D features [V ; E] (a multiply and an add, x3 for backward); independent of T and of the scan form."""
    return 12 * 2 * c["width"]

  @staticmethod
  def max_context(c: dict[str, Any]) -> int | None:
    """The most tokens a decode state holds: None, the state does not grow."""
    return None

  @staticmethod
  def summary(c: dict[str, Any]) -> str:
    return (f"MCSD C={c['channels']} combine={c['combine']} include_current={c['include_current']} "
            f"learnable_rates={c['learnable_rates']}")

  def __init__(self, c: dict[str, Any], w: dict[str, np.ndarray]):
    self.c, self.w = c, w  # w: this layer's arrays, named as in `shapes`
    self._log_rates = ((-np.exp(w["rate_logits"])).astype(F32) if c["learnable_rates"]
                       else paper_log_rates(c["channels"]))  # computed once: no token changes them

  def log_rates(self) -> np.ndarray:
    """[2, C]: log g (slope) and log alpha (decay), learned (-exp(rate_logits)) or the paper's."""
    return self._log_rates

  def recurrence_log_rates(self, xc: np.ndarray) -> np.ndarray:
    """The log rates of the 2C recurrence channels [V ; E] for inputs xc [b, t, C, Dc]: fixed, [2C]
    (the data-dependent-decay twin, mcsd_dd.py, returns [b, t, 2C])."""
    return self.log_rates().reshape(-1)

  def init_state(self, batch: int, max_len: int | None = None) -> MCSDState:
    """Empty state (its size does not depend on `max_len`)."""
    return MCSDState(np.zeros((batch, 2 * self.c["channels"], self.c["width"] // self.c["channels"]), F32),
                     np.zeros((batch,), np.int64))

  def __call__(self, x, inputs: BlockInputs, state: MCSDState | None = None) -> tuple[np.ndarray, MCSDState]:
    """x [b, t, D] -> (y [b, t, D], state after x); no state: a fresh one (documents start at inputs.reset)."""
    c, w = self.c, self.w
    b, t, _ = x.shape
    ch = c["channels"]
    dc = c["width"] // ch
    reset = inputs.reset
    if state is None:
      state = self.init_state(b)
    # 1. Per-channel projections: proj [C, Dc, 4, Dc] gives U, V, E, F, each [b, t, C, Dc] (C BLAS products).
    xc = x.reshape(b, t, ch, dc)
    projected = np.matmul(xc.reshape(b * t, ch, dc).transpose(1, 0, 2), w["proj"].reshape(ch, dc, 4 * dc))
    u, v, e, f = projected.reshape(ch, b, t, 4, dc).transpose(3, 1, 2, 0, 4)  # from [C, b t, 4 Dc]
    # 2. Rates of the 2C recurrence channels, per token: [b, t, 2C, 1].
    a = np.broadcast_to(np.exp(self.recurrence_log_rates(xc))[..., None], (b, t, 2 * ch, 1))
    log_g = self.log_rates()[0]
    # 3. The recurrence h_n = a h_{n-1} + [V_n ; E_n], cut at document starts, and the history each token
    #    reads: h_n (include_current) or a h_{n-1} (strict past; zero at a document start).
    h, count = state.h, state.count.copy()
    history = np.empty((b, t, 2 * ch, dc), F32)
    counts = np.empty((b, t), np.int64)
    for n in range(t):
      r = reset[:, n][:, None, None]
      count = np.where(reset[:, n], 0, count)
      previous = np.where(r, F32(0), h)
      h = (a[:, n] * previous + np.concatenate([v[:, n], e[:, n]], axis=1)).astype(F32)
      history[:, n] = h if c["include_current"] else a[:, n] * previous
      counts[:, n] = count
      count = count + 1
    # 4. Slope: normalised history of V; the normaliser is sum_{j=1..k} g^j (strict past) or
    #    sum_{j=0..k} g^j (include_current) for the k-th token of its document (k counts from 0).
    k = counts[..., None].astype(F32)  # [b, t, 1]
    geometric = np.expm1(k * log_g) / np.expm1(log_g)  # sum_{j=0}^{k-1} g^j, [b, t, C]
    z = (np.exp(log_g) * geometric if not c["include_current"] else geometric + np.exp(k * log_g))[..., None]
    v_hist = np.where(z > 0, history[:, :, :ch] / np.where(z > 0, z, F32(1)), v)  # first token: V itself
    theta_s = silu(v_hist.astype(F32)) * u
    # 5. Decay: RMSNorm over each channel's Dc features of the E history, gated by sigmoid(F).
    theta_d = rms_norm(history[:, :, ch:], w["decay_norm.scale"], c["norm_eps"]) * sigmoid(f)
    # 6. Combine: concat + output projection out [2, C, Dc, D], or the sum.
    if c["combine"] == "concat":
      both = np.concatenate([theta_s, theta_d], axis=2).reshape(b, t, 2 * c["width"])  # [Theta_s ; Theta_d]
      y = both @ w["out"].reshape(2 * c["width"], c["width"])
    else:
      y = (theta_s + theta_d).reshape(b, t, c["width"])
    return y.astype(F32), MCSDState(h, count)
