"""Sliding-window causal self-attention in NumPy (each query sees the W latest tokens of its document, itself
included; a ring of W slots to decode), and what yanjax knows about it from the config alone (registered in
mixers.py). The JAX model is yanjax/model/swa.py; the projections and RoPE are attention.py's.

Shapes: the legend in docs/model.md (t: query time, s: key time; W: window, ring-buffer slots).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .attention import Attention
from .layers import F32, BlockInputs


class RingState(NamedTuple):
  """Decode state of one sliding-window layer, fixed in size: its document's latest W keys and values, the token
  at position t in slot t % W. Its arrays are written in place, as KVState's (copy k and v to branch)."""
  k: np.ndarray  # [b, W, H, Dh] float32 (keys after RoPE)
  v: np.ndarray  # [b, W, H, Dh] float32
  count: int  # tokens consumed, the same for every row: the next token's position


def band(q_index: np.ndarray, k_index: np.ndarray, window: int) -> np.ndarray:
  """q_index [t], k_index [s] -> [t, s] bool: the key at row j is in the window of the query at row i,
  i - W < j <= i."""
  offset = q_index[:, None] - k_index[None, :]
  return (offset >= 0) & (offset < window)


class SlidingWindowAttention(Attention):
  """Causal multi-head self-attention of one layer within a window of W tokens: x [b, t, D] -> y [b, t, D], with
  a ring-buffer state. Static methods: its facts, from the config `c` (the mapping `format.check_config` returns).
  Always the dense form: one masked [t, t] (or [t, W + t]) product."""

  @staticmethod
  def check(c: dict[str, Any]) -> tuple[str, str] | None:
    """(config key, why) of the first value this mixer cannot run with, or None."""
    window = c["window"]
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
      return "window", "must be a positive integer"
    return Attention.check(c)

  @staticmethod
  def check_training(c: dict[str, Any], seq_len: int) -> tuple[str, str] | None:
    """A window longer than the training sequence: full attention in training, and only a cost in decoding."""
    if c["window"] > seq_len:
      return "window", (f"the sliding window must be <= train.seq_len={seq_len} (a longer one is full attention "
                        "in training and only costs decode memory): lower it, or use 'attention' in model.pattern")
    return None

  @staticmethod
  def mixing_flops(c: dict[str, Any], seq_len: int) -> int:
    """Training FLOPs per token of one layer's sequence mixing outside its weights: 12 min(T, W) D, attention's
    count with each query's QK^T and AV products spanning at most W keys. The JAX training pass computes more:
    the whole masked T x T product for T <= 2W, and 2W keys a query (blocks of W) beyond."""
    return 12 * min(seq_len, c["window"]) * c["width"]

  @staticmethod
  def max_context(c: dict[str, Any]) -> int | None:
    """None: the ring of W slots bounds nothing, any context decodes (each token seeing the last W)."""
    del c
    return None

  @staticmethod
  def summary(c: dict[str, Any]) -> str:
    return f"swa H={c['heads']} W={c['window']}"

  def init_state(self, batch: int, max_len: int | None = None) -> RingState:
    """An empty ring of W slots; `max_len` is ignored (the state does not grow with the context)."""
    del max_len
    shape = (batch, self.c["window"], self.c["heads"], self.c["width"] // self.c["heads"])
    return RingState(np.zeros(shape, F32), np.zeros(shape, F32), 0)

  def __call__(self, x, inputs: BlockInputs, state: RingState | None = None
               ) -> tuple[np.ndarray, RingState | None]:
    """x [b, t, D] -> (y [b, t, D], state after x). No state: a whole (packed) sequence, the query at row i seeing
    the rows i - W < j <= i of its segment; with one, the call continues one document per row from the ring and
    leaves its last min(t, W) keys and values there."""
    window, t = self.c["window"], x.shape[1]
    q, k, v = self.project_in(x, inputs.positions)
    if state is None:
      segment_ids = inputs.segment_ids
      mask = band(np.arange(t), np.arange(t), window)[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
      return self.attend(q, k, v, mask), None
    last = state.count - 1
    ring_index = last - (last - np.arange(window)) % window  # the latest position t <= last in slot t % W
    rows = state.count + np.arange(t)
    key_index = np.concatenate([ring_index, rows])
    mask = (band(rows, key_index, window) & (key_index >= 0))[None]  # a negative position: a slot not yet written
    keys, values = np.concatenate([state.k, k], axis=1), np.concatenate([state.v, v], axis=1)
    kept = min(t, window)
    slots = rows[t - kept:] % window
    state.k[:, slots], state.v[:, slots] = k[:, t - kept:], v[:, t - kept:]
    return self.attend(q, keys, values, mask), RingState(state.k, state.v, state.count + t)
