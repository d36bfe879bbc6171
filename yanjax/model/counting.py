"""Parameter counts and training FLOPs per token, each written once, from the config alone.

Notation: V vocab, D width, L layers, F FFN hidden width, C channels, Dc = D / C, H heads, E groups,
g = F / E neurons per group, k groups active per token, R router hidden width, T sequence length.

Per layer (tests check these against the instantiated model):
  norms                      2 D
  MCSD mixer                 4 C Dc^2 (U, V, E, F; block-diagonal) + D (decay RMSNorm)
                             + 2 D^2 (concat output projection; none for combine="sum") + 2 C (learnable rates)
  attention mixer            4 D^2 (q, k, v, output)
  dense GeGLU FFN            3 D F
  selective FFN              3 D F (all groups) + D R + R E (router); active per token: 3 D g k + D R + R E
Model: V D embedding, + D V head when untied, + D final norm.

Training FLOPs per token = 6 x (weights in matmuls that each token uses: mixer and FFN projections, the active
groups and router, the output head; not the embedding lookup) + the sequence mixing:
  attention: 12 L T D   (QK^T and AV, forward 2 x 2 T D per layer, x3 for backward; PaLM appendix B,
             counting the full T x T product as MaxText does, though a causal mask could skip half)
  MCSD:      12 L (2D)  (the recurrence over the 2D features [V ; E]: a multiply and an add, x3 for backward;
             independent of T, and of which scan form runs it)
"""

from __future__ import annotations

from typing import NamedTuple

from yanjax.config import ModelConfig


class ParamCount(NamedTuple):
  total: int
  active: int  # used by one token (differs from total only with the selective-activation router)
  matmul_active: int  # active weights that enter matmuls (the FLOPs formula's N)


def _mixer(cfg: ModelConfig) -> tuple[int, int]:
  """(all mixer parameters, those in matmuls) of one layer."""
  d = cfg.width
  if cfg.arch == "attention":
    return 4 * d * d, 4 * d * d
  matmul = 4 * cfg.channels * cfg.channel_width ** 2 + (2 * d * d if cfg.combine == "concat" else 0)
  return matmul + d + (2 * cfg.channels if cfg.learnable_rates else 0), matmul


def _ffn(cfg: ModelConfig) -> tuple[int, int]:
  """(all FFN parameters, active per token) of one layer; all of them enter matmuls."""
  d, f = cfg.width, cfg.mlp_width
  if not cfg.router:
    return 3 * d * f, 3 * d * f
  router = d * cfg.router_hidden + cfg.router_hidden * cfg.groups
  return 3 * d * f + router, 3 * d * cfg.group_width * cfg.top_k + router


def param_count(cfg: ModelConfig) -> ParamCount:
  d, v = cfg.width, cfg.vocab_size
  mixer_all, mixer_matmul = _mixer(cfg)
  ffn_all, ffn_active = _ffn(cfg)
  head = 0 if cfg.tie_embeddings else d * v
  shared = v * d + head + d
  total = shared + cfg.layers * (2 * d + mixer_all + ffn_all)
  active = shared + cfg.layers * (2 * d + mixer_all + ffn_active)
  matmul_active = d * v + cfg.layers * (mixer_matmul + ffn_active)
  return ParamCount(total, active, matmul_active)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training (forward + backward) FLOPs per token at sequence length `seq_len`."""
  mixing = 12 * cfg.layers * seq_len * cfg.width if cfg.arch == "attention" else 12 * cfg.layers * 2 * cfg.width
  return 6.0 * param_count(cfg).matmul_active + mixing
