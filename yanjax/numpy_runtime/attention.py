"""Causal self-attention with RoPE in NumPy (the baseline's mixer), and what yanjax knows about it from the
config alone (registered in mixers.py). The JAX model is yanjax/model/attention.py.

Shapes: the legend in docs/model.md (t: query time, s: key time or KV-cache slot).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .layers import F32, BlockInputs, softmax


class KVState(NamedTuple):
  """KV cache of one attention layer. Its arrays are written in place: a state passed to prefill or
  decode_step is used up (copy k and v first to branch a generation)."""
  k: np.ndarray  # [b, s, H, Dh] float32 (keys after RoPE)
  v: np.ndarray  # [b, s, H, Dh] float32
  length: int  # slots filled (the same for every row)


def rope(x, positions, theta):
  """Rotary embedding, rotate-half convention: x [b, t, H, Dh], positions [b, t]."""
  half = x.shape[-1] // 2
  freq = (F32(theta) ** (-np.arange(half, dtype=F32) / F32(half))).astype(F32)
  angle = positions[..., None, None].astype(F32) * freq  # [b, t, 1, Dh / 2]
  x1, x2 = x[..., :half], x[..., half:]
  cos, sin = np.cos(angle), np.sin(angle)
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(F32)


class Attention:
  """Causal multi-head self-attention of one layer: x [b, t, D] -> y [b, t, D], with a KV cache. Static
  methods: its facts, from the config `c` (the mapping `format.check_config` returns)."""

  @staticmethod
  def check(c: dict[str, Any]) -> tuple[str, str] | None:
    """(config key, why) of the first value this mixer cannot run with, or None."""
    if c["width"] % c["heads"]:
      return "heads", f"width {c['width']} must be divisible by heads"
    if (c["width"] // c["heads"]) % 2:
      return "heads", f"head dim {c['width'] // c['heads']} must be even for RoPE"
    return None

  @staticmethod
  def check_training(c: dict[str, Any], seq_len: int) -> tuple[str, str] | None:
    """(config key, why) of a value this mixer cannot train with on sequences of `seq_len`, or None."""
    return None

  @staticmethod
  def shapes(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Its arrays (export names after `blocks.{i}.mixer.`) -> shape, in canonical order."""
    d, h = c["width"], c["heads"]
    return {"qkv": (d, 3, h, d // h), "out": (h, d // h, d)}  # q, k, v projections; output projection

  @staticmethod
  def params(c: dict[str, Any]) -> tuple[int, int]:
    """(all parameters, those in matmuls) of one layer: 4 D^2 (q, k, v, output), all in matmuls."""
    return 4 * c["width"] ** 2, 4 * c["width"] ** 2

  @staticmethod
  def mixing_flops(c: dict[str, Any], seq_len: int) -> int:
    """Training FLOPs per token of one layer's sequence mixing outside its weights: 12 T D (QK^T and AV,
    forward 2 x 2 T D, x3 for backward; PaLM appendix B, counting the full T x T product as MaxText does,
    though a causal mask could skip half)."""
    return 12 * seq_len * c["width"]

  @staticmethod
  def max_context(c: dict[str, Any]) -> int | None:
    """The most tokens a decode cache holds: the JAX model preallocates `max_decode_len` slots."""
    return c["max_decode_len"]

  @staticmethod
  def summary(c: dict[str, Any]) -> str:
    return f"attention H={c['heads']}"

  def __init__(self, c: dict[str, Any], w: dict[str, np.ndarray]):
    self.c, self.w = c, w  # w: this layer's arrays, named as in `shapes`

  def init_state(self, batch: int, max_len: int | None = None) -> KVState:
    """Empty KV cache of `max_len` slots (default: the config's max_decode_len)."""
    shape = (batch, max_len or self.c["max_decode_len"], self.c["heads"], self.c["width"] // self.c["heads"])
    return KVState(np.zeros(shape, F32), np.zeros(shape, F32), 0)

  def __call__(self, x, inputs: BlockInputs, state: KVState | None = None) -> tuple[np.ndarray, KVState | None]:
    """x [b, t, D] -> (y [b, t, D], state after x). No state: a whole (packed) sequence, each query seeing the
    earlier keys of its segment; with one, the new keys are appended to its KV cache (one document per row)."""
    t = x.shape[1]
    q, k, v = self.project_in(x, inputs.positions)
    if state is None:
      segment_ids = inputs.segment_ids
      mask = np.tril(np.ones((t, t), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    else:
      start, end = state.length, state.length + t
      if end > state.k.shape[1]:
        raise ValueError(f"the KV cache holds {state.k.shape[1]} tokens; {end} were asked for (raise max_len "
                         f"in init_state)")
      state.k[:, start:end], state.v[:, start:end] = k, v
      state = KVState(state.k, state.v, end)
      k, v = state.k[:, :end], state.v[:, :end]
      mask = (np.arange(end)[None, :] <= (start + np.arange(t))[:, None])[None]  # [1, t, s]
    return self.attend(q, k, v, mask), state

  def project_in(self, x, positions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [b, t, D], positions [b, t] -> q, k, v [b, t, H, Dh], q and k rotated (RoPE) to their positions."""
    qkv = self.w["qkv"]  # [D, 3, H, Dh]
    q, k, v = np.moveaxis((x @ qkv.reshape(qkv.shape[0], -1)).reshape(*x.shape[:2], *qkv.shape[1:]), 2, 0)
    theta = self.c["rope_theta"]
    return rope(q, positions, theta), rope(k, positions, theta), v

  def attend(self, q, k, v, mask) -> np.ndarray:
    """q [b, t, H, Dh] attends to k, v [b, s, H, Dh] where mask [b or 1, t, s] is True -> y [b, t, D] (after the
    output projection)."""
    scores = np.einsum("bthe,bshe->bhts", q, k) / F32(np.sqrt(q.shape[-1]))
    scores = np.where(mask[:, None], scores, F32(-np.inf))
    attended = np.einsum("bhts,bshe->bthe", softmax(scores, axis=-1), v)
    out = self.w["out"]  # [H, Dh, D]
    return (attended.reshape(*attended.shape[:2], -1) @ out.reshape(-1, out.shape[-1])).astype(F32)
