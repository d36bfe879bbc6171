"""Parameter counts and training FLOPs per token, each written once, from the config alone.

Shapes: the legend in docs/model.md.

Per layer (tests check these against the instantiated model), summed over the layers with each layer's mixer
(`model.pattern` repeated):
  norms                      2 D
  mixer                      its twin's `params` (yanjax/numpy_runtime/mixers.py): MCSD 4 C Dc^2
                             + 2 D^2 (concat) + D + 2 C (learnable rates) (mcsd_dd: + D, its rate gate),
                             attention and sliding-window attention 4 D^2
  dense GeGLU FFN            3 D F
  selective FFN              3 D F (all groups) + D R + R E (router); active per token: 3 D g k + D R + R E
Model: V D embedding, + D V head when untied, + D final norm.

Training FLOPs per token = 6 x (weights in matmuls that each token uses: mixer and FFN projections, the active
groups and router, the output head; not the embedding lookup) + every layer's sequence mixing, its twin's
`mixing_flops`: attention 12 T D (QK^T and AV), sliding-window attention 12 min(T, W) D, MCSD 12 (2D) (the
recurrence, independent of T; mcsd_dd + 6 D, its rate gate).
"""

from __future__ import annotations

from typing import NamedTuple

from yanjax.model.config import ModelConfig
from yanjax.numpy_runtime.mixers import TWINS


class ParamCount(NamedTuple):
  total: int
  active: int  # used by one token (differs from total only with selective activation)
  matmul_active: int  # active weights that enter matmuls (the FLOPs formula's N)


def _ffn(cfg: ModelConfig) -> tuple[int, int]:
  """(all FFN parameters, active per token) of one layer; all of them enter matmuls."""
  d, f = cfg.width, cfg.mlp_width
  if not cfg.router:
    return 3 * d * f, 3 * d * f
  router = d * cfg.router_hidden + cfg.router_hidden * cfg.groups
  return 3 * d * f + router, 3 * d * cfg.group_width * cfg.top_k + router


def param_count(cfg: ModelConfig) -> ParamCount:
  d, v = cfg.width, cfg.vocab_size
  c = cfg.to_dict()
  mixer_all, mixer_matmul = (sum(counts) for counts in zip(*(TWINS[name].params(c) for name in cfg.layer_mixers)))
  ffn_all, ffn_active = _ffn(cfg)
  head = 0 if cfg.tie_embeddings else d * v
  shared = v * d + head + d
  total = shared + mixer_all + cfg.layers * (2 * d + ffn_all)
  active = shared + mixer_all + cfg.layers * (2 * d + ffn_active)
  matmul_active = d * v + mixer_matmul + cfg.layers * ffn_active
  return ParamCount(total, active, matmul_active)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training (forward + backward) FLOPs per token at sequence length `seq_len`."""
  mixing = sum(TWINS[name].mixing_flops(cfg.to_dict(), seq_len) for name in cfg.layer_mixers)
  return 6.0 * param_count(cfg).matmul_active + mixing
