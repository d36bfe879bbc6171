"""Parameter counts and training FLOPs per token, each written once, from the config alone.

Shapes: the legend in docs/model.md.

Per layer (tests check these against the instantiated model):
  norms                      2 D
  mixer                      its `params` in the registry (yanjax/numpy_runtime/mixers.py): MCSD 4 C Dc^2
                             + 2 D^2 (concat) + D + 2 C (learnable rates) (mcsd_dd: + D, its rate gate),
                             attention 4 D^2
  dense GeGLU FFN            3 D F
  selective FFN              3 D F (all groups) + D R + R E (router); active per token: 3 D g k + D R + R E
Model: V D embedding, + D V head when untied, + D final norm.

Training FLOPs per token = 6 x (weights in matmuls that each token uses: mixer and FFN projections, the active
groups and router, the output head; not the embedding lookup) + L x one layer's sequence mixing, its
`mixing_flops` in the registry: attention 12 T D (QK^T and AV), MCSD 12 (2D) (the recurrence, independent of T;
mcsd_dd + 6 D, its rate gate).
"""

from __future__ import annotations

from typing import NamedTuple

from yanjax.model.config import ModelConfig
from yanjax.numpy_runtime.mixers import MIXERS


class ParamCount(NamedTuple):
  total: int
  active: int  # used by one token (differs from total only with the selective-activation router)
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
  mixer_all, mixer_matmul = MIXERS[cfg.mixer].twin.params(cfg.to_dict())
  ffn_all, ffn_active = _ffn(cfg)
  head = 0 if cfg.tie_embeddings else d * v
  shared = v * d + head + d
  total = shared + cfg.layers * (2 * d + mixer_all + ffn_all)
  active = shared + cfg.layers * (2 * d + mixer_all + ffn_active)
  matmul_active = d * v + cfg.layers * (mixer_matmul + ffn_active)
  return ParamCount(total, active, matmul_active)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training (forward + backward) FLOPs per token at sequence length `seq_len`."""
  mixing = cfg.layers * MIXERS[cfg.mixer].twin.mixing_flops(cfg.to_dict(), seq_len)
  return 6.0 * param_count(cfg).matmul_active + mixing
