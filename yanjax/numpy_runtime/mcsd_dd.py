"""MCSD with data-dependent decay in NumPy (registered in mixers.py as "mcsd_dd"): the MCSD twin with the decay
rates gated per token, log a_{n,i} = log(alpha_i) softplus(rate_gate_i . x_{n,i} + log(e - 1)). The JAX model,
and why only the decay section is gated, is yanjax/model/mcsd_dd.py; docs/export.md lists its steps.

Shapes: the legend in docs/model.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .layers import F32, softplus
from .mcsd import MCSD

GATE_BIAS = F32(np.log(np.e - 1))  # softplus(GATE_BIAS) = 1: a zero gate gives the paper's rates


class MCSDDataDecay(MCSD):
  """MCSD mixer of one layer whose decay rates depend on the token; MCSD's O(1) state. Static methods: its facts,
  from the config `c`."""

  @staticmethod
  def shapes(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """MCSD's arrays, with `rate_gate` [C, Dc] (the per-channel gate of the decay rates) before the decay norm."""
    items = list(MCSD.shapes(c).items())
    at = [name for name, _ in items].index("decay_norm.scale")
    return dict(items[:at] + [("rate_gate", (c["channels"], c["width"] // c["channels"]))] + items[at:])

  @staticmethod
  def params(c: dict[str, Any]) -> tuple[int, int]:
    """MCSD's, + D (rate_gate: C Dc, a dot product per channel, counted in `mixing_flops`, not in matmuls)."""
    total, matmul = MCSD.params(c)
    return total + c["width"], matmul

  @staticmethod
  def mixing_flops(c: dict[str, Any], seq_len: int) -> int:
    """MCSD's, + 6 D: the gate's dot products (a multiply and an add per feature, x3 for backward)."""
    return MCSD.mixing_flops(c, seq_len) + 6 * c["width"]

  @staticmethod
  def summary(c: dict[str, Any]) -> str:
    return MCSD.summary(c) + " decay=data-dependent"

  def recurrence_log_rates(self, xc: np.ndarray) -> np.ndarray:
    """xc [b, t, C, Dc] -> [b, t, 2C]: the slope half fixed (log g), the decay half log alpha times the gate."""
    log_g, log_alpha = self.log_rates()
    gate = softplus(np.einsum("btcd,cd->btc", xc.astype(F32), self.w["rate_gate"]) + GATE_BIAS)
    return np.concatenate([np.broadcast_to(log_g, gate.shape), log_alpha * gate], axis=-1).astype(F32)
