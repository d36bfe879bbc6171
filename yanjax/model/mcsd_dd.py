"""MCSD with data-dependent decay: the decay section's rate is gated per token, as in gated linear attention
and Mamba-2. Beyond the paper (arXiv 2406.12230), which fixes it.

  log a_{n,i} = log(alpha_i) * softplus(w_i . x_{n,i} + log(e - 1))

x_{n,i} [Dc] is token n's input in channel i (MCSD's per-channel split), w_i [Dc] a row of `rate_gate` [C, Dc]
(block-diagonal like MCSD's projections), initialised near zero so that the multiplier starts at
softplus(log(e - 1)) = 1: the paper's rates. The multiplier lies in (0, inf), so 0 < a < 1 always. alpha_i is the
paper's rate, or the learnable one (`learnable_rates`). The decay history stays a first-order linear recurrence:
strict past E'_n = a_n h_{n-1} (zero at a document start), or h_n with `include_current`.

The slope section keeps MCSD's fixed (or learnable) rates: it is a normalised local average, and its normaliser
sum_j g^j is closed-form only for a fixed g. Everything else is MCSD's (yanjax/model/mcsd.py): the same
projections, combine, cache ([b, 2C, Dc] and the count: O(1) in the context) and __call__, which asks
`recurrence_log_rates` for the rates of its 2C recurrence channels.

Shapes: the legend in docs/model.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from yanjax.model import layers
from yanjax.model.config import ModelConfig
from yanjax.model.mcsd import MCSD
from yanjax.model.partitioning import Term

GATE_BIAS = float(np.log(np.e - 1))  # softplus(GATE_BIAS) = 1: a zero gate gives the paper's rates


class MCSDDataDecay(MCSD):
  """MCSD whose decay rates depend on the token: [b, t, D] -> [b, t, D], with MCSD's O(1) decode cache."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.rate_gate = layers.param(rngs, (cfg.channels, cfg.channel_width), ("channels", None),
                                  layers.normal(cfg.init_std))

  def recurrence_log_rates(self, xc: jax.Array) -> jax.Array:
    """xc [b, t, C, Dc] -> [b, t, 2C] float32: the slope half fixed (log g), the decay half log alpha times
    the token's gate."""
    log_g, log_alpha = self.log_rates()
    gate = jax.nn.softplus(jnp.einsum("btcd,cd->btc", xc.astype(jnp.float32), self.rate_gate[...]) + GATE_BIAS)
    return jnp.concatenate([jnp.broadcast_to(log_g, gate.shape), log_alpha * gate], axis=-1)

  @staticmethod
  def residual_terms(cfg: ModelConfig, t: int, itemsize: int) -> list[Term]:
    """MCSD's, plus what the gradient of per-token rates reads (counted from JAX's saved residuals): earlier
    states and recurrence inputs [b, t, 2C, Dc] (float32), the gate's input [b, t, C, Dc] and the gate [b, t, C]."""
    shape, axes = (cfg.channels, cfg.channel_width), ("channels", None)
    return [*MCSD.residual_terms(cfg, t, itemsize),
            Term("MCSD decay rates' gradient: states, inputs (float32)", shape, axes, 4, 4),
            Term("MCSD decay gate input", shape, axes, itemsize, 1),
            Term("MCSD decay gate (float32)", (cfg.channels,), ("channels",), 4, 2)]
