"""Sliding-window causal self-attention: each query sees the W latest tokens of its document, itself included, so
its decode state is a ring buffer of W slots and a decode step costs O(W) whatever the context's length.

Attention's parameters (qkv, out) and RoPE (yanjax/model/attention.py); only the mask and the cache differ. On XLA
a pass of t <= 2W tokens is one masked [t, t] product ([t, W + t] with a cache); a longer one goes in blocks of W
queries, each over its block and the one before (2W keys a query), so its cost grows as t W, not t^2. A pass without
cache that cuDNN runs (`model.attention_kernel`, yanjax/model/attention_kernel.py) is one fused call whatever t:
the window is its `local_window_size`, applied inside the kernel, but the document mask it takes is [b, 1, t, t].
With the sequence split over S devices (mesh.sequence) and segments of at least W tokens, each device runs its
segment in blocks, the first block's previous one being the W rows before the segment: the neighbouring device's
last W keys and values, the only ones that cross devices (`split_window_attention`).
Shapes: the legend in docs/model.md (t: query time, s: key time; W: window, ring-buffer slots).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from yanjax.model import attention_kernel, layers
from yanjax.model.attention import Attention
from yanjax.model.config import ModelConfig
from yanjax.model.partitioning import Term, from_segments, length_ways, to_segments


class RingCache(NamedTuple):
  """Decode state of one sliding-window block, fixed in size: its document's latest W keys and values, the token
  at position t in slot t % W."""
  k: jax.Array  # [b, W, H, Dh] compute dtype (keys after RoPE)
  v: jax.Array  # [b, W, H, Dh]
  count: jax.Array  # [b] int32: tokens consumed (the next token's position)


class Keys(NamedTuple):
  """Keys and values with what the mask reads of them: their row index (time) and segment."""
  k: jax.Array  # [b, s, H, Dh]
  v: jax.Array  # [b, s, H, Dh]
  index: jax.Array  # [b, s] int32
  segment: jax.Array  # [b, s] int32: a query sees only keys of its own segment


def dense_attention(q: jax.Array, index: jax.Array, segment: jax.Array, keys: Keys, window: int) -> jax.Array:
  """q [b, t, H, Dh] at rows index [b, t] of segment [b, t] -> attended [b, t, H, Dh]: the query at row i attends to
  the keys at rows j of its segment with i - W < j <= i (one masked [t, s] product)."""
  offset = index[:, :, None] - keys.index[:, None, :]  # [b, t, s]
  mask = (offset >= 0) & (offset < window) & (segment[:, :, None] == keys.segment[:, None, :])
  return jax.nn.dot_product_attention(q, keys.k, keys.v, mask=mask[:, None])


def blocked_attention(q: jax.Array, new: Keys, before: Keys, window: int) -> jax.Array:
  """`dense_attention(q, new.index, new.segment, before + new, window)` with the queries in blocks of W, each
  attending to its block and the one before: O(t W) instead of O(t (t + W)).

  q [b, t, H, Dh] at the rows of `new` (t keys); `before`: the W rows before them (the first block's previous one).
  """
  b, t = new.index.shape
  n = -(-t // window)  # blocks, the last one completed with rows no query of a document sees
  q = jnp.pad(q, [(0, 0), (0, n * window - t), (0, 0), (0, 0)])
  padded = _concat(new, _unseen(new, n * window - t))
  def with_previous(rows, prev):  # [b, n W, ...], [b, W, ...] -> [b n, 2 W, ...]: each block after the one before
    cur = rows.reshape(b, n, window, *rows.shape[2:])
    shifted = jnp.concatenate([prev[:, None], cur[:, :-1]], axis=1)
    return jnp.concatenate([shifted, cur], axis=2).reshape(b * n, 2 * window, *rows.shape[2:])
  keys = Keys(*(with_previous(rows, prev) for rows, prev in zip(padded, before)))
  flat = [a.reshape(b * n, window, *a.shape[2:]) for a in (q, padded.index, padded.segment)]
  return dense_attention(*flat, keys, window).reshape(q.shape)[:, :t]


def window_attention(q: jax.Array, new: Keys, window: int, before: Keys | None = None) -> jax.Array:
  """q [b, t, H, Dh] at the rows of `new` (t keys) -> attended [b, t, H, Dh], each query seeing the keys of its
  segment among the W latest rows, itself included; `before`: W rows before `new` (a decode cache's ring) or None.

  Dense (one masked [t, t] or [t, W + t] product) for t <= 2W, blocked beyond, where it costs less.
  """
  if q.shape[1] > 2 * window:
    return blocked_attention(q, new, _unseen(new, window) if before is None else before, window)
  return dense_attention(q, new.index, new.segment, new if before is None else _concat(before, new), window)


def split_window_attention(q: jax.Array, new: Keys, window: int) -> jax.Array:
  """`window_attention(q, new, window)` of a pass without cache, each device's segment on its own when the sequence
  is split over S devices with segments of t / S >= W rows: blocked, the W rows before a segment from its
  neighbour (the first segment's: unseen rows). Otherwise (no split, or shorter segments) `window_attention`."""
  t = q.shape[1]
  segments = length_ways(t)
  if segments == 1 or t // segments < window:
    return window_attention(q, new, window)
  heads = ("heads", None)
  new = Keys(*(to_segments(a, segments, axes) for a, axes in zip(new, (heads, heads, (), ()))))  # [S b, t / S, ...]
  attended = blocked_attention(to_segments(q, segments, heads), new, _rows_before(new, segments, window), window)
  return from_segments(attended, segments, heads)


def _rows_before(keys: Keys, segments: int, window: int) -> Keys:
  """Segment rows [S b, t / S, ...] -> the W rows before each segment [S b, W, ...]: the previous segment's last W
  (moved from its device), unseen rows before the first."""
  b = keys.index.shape[0] // segments
  unseen = _unseen(Keys(*(a[:b] for a in keys)), window)

  def shifted(rows, first):  # [S b, t / S, ...], [b, W, ...] -> [S b, W, ...]
    tails = rows[:, -window:].reshape(segments, b, window, *rows.shape[2:])
    return jnp.concatenate([first[None], tails[:-1]]).reshape(segments * b, window, *rows.shape[2:])
  return Keys(*(shifted(rows, first) for rows, first in zip(keys, unseen)))


def _unseen(like: Keys, rows: int) -> Keys:
  """`rows` rows of zero keys shaped as those of `like`, in segment -1, which no query of a document sees."""
  b = like.index.shape[0]
  return Keys(jnp.zeros((b, rows, *like.k.shape[2:]), like.k.dtype), jnp.zeros((b, rows, *like.v.shape[2:]),
              like.v.dtype), jnp.zeros((b, rows), jnp.int32), jnp.full((b, rows), -1, jnp.int32))


def _concat(first: Keys, second: Keys) -> Keys:
  return Keys(*(jnp.concatenate(pair, axis=1) for pair in zip(first, second)))


class SlidingWindowAttention(Attention):
  """Causal multi-head self-attention within a window of W = cfg.window tokens: [b, t, D] -> [b, t, D]."""

  def init_cache(self, batch: int, dtype) -> RingCache:
    """An empty ring of W slots, keys and values in the compute `dtype`."""
    shape = (batch, self.cfg.window, self.cfg.heads, self.cfg.head_dim)
    return RingCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

  def __call__(self, x: jax.Array, inputs: layers.BlockInputs, cache: RingCache | None = None
               ) -> tuple[jax.Array, RingCache | None]:
    """x [b, t, D] -> (y [b, t, D], cache after x or None); RoPE at `inputs.positions`.

    Without a cache the query at row i sees the rows i - W < j <= i of its segment (`inputs.segment_ids`: packed
    documents stay apart), by cuDNN or XLA (`Attention.kernel`); with a cache the call continues one document from
    the ring (prefill or one decode step), on XLA, and leaves its last min(t, W) keys and values there.
    """
    q, k, v = self.project_in(x, inputs.positions)
    b, t = x.shape[:2]
    if cache is None and self.kernel(q) == "cudnn":
      attended = attention_kernel.fused_attention(q, k, v, inputs.segment_ids, self.cfg.window)
    elif cache is None:
      rows = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      attended = split_window_attention(q, Keys(k, v, rows, inputs.segment_ids), self.cfg.window)
    else:
      rows = cache.count[:, None] + jnp.arange(t, dtype=jnp.int32)  # positions in the document
      new = Keys(k, v, rows, jnp.ones((b, t), jnp.int32))
      attended = window_attention(q, new, self.cfg.window, _ring_keys(cache, x.dtype))
      cache = _ring_write(cache, k, v)
    return self.project_out(attended), cache

  @staticmethod
  def keys_per_query(cfg: ModelConfig, t: int) -> int:
    """The keys each query's logits span in a training pass of t tokens: t (dense, t <= 2W) or 2W (blocked; the
    padding of t to a multiple of W aside)."""
    return min(t, 2 * cfg.window)

  @staticmethod
  def residual_terms(cfg: ModelConfig, t: int, itemsize: int) -> list[Term]:
    """Attention's (yanjax.training.plan), with XLA's logits over `keys_per_query` keys, where the blocked form also
    keeps each key and value a second time, in the next block's keys; cuDNN's one call takes the whole t."""
    if cfg.attention_kernel == "cudnn":
      return Attention.residual_terms(cfg, t, itemsize)
    terms = Attention.residual_terms(cfg, SlidingWindowAttention.keys_per_query(cfg, t), itemsize)
    if t > 2 * cfg.window:
      terms.append(Term("k, v again in the next block", (cfg.heads, cfg.head_dim), ("heads", None), itemsize, 2))
    return terms

  @staticmethod
  def backward_terms(cfg: ModelConfig, t: int) -> list[Term]:
    """Attention's, with XLA's logits over `keys_per_query` keys."""
    keys = t if cfg.attention_kernel == "cudnn" else SlidingWindowAttention.keys_per_query(cfg, t)
    return Attention.backward_terms(cfg, keys)


def _ring_keys(cache: RingCache, dtype) -> Keys:
  """The ring's W slots as keys in `dtype`, each at the position it holds; a slot not yet written (a negative
  position) is in segment 0, which no query of the cached document (segment 1) sees."""
  window = cache.k.shape[1]
  last = cache.count[:, None] - 1  # [b, 1]
  index = last - (last - jnp.arange(window, dtype=jnp.int32)) % window  # the latest position t <= last in slot t % W
  return Keys(cache.k.astype(dtype), cache.v.astype(dtype), index, (index >= 0).astype(jnp.int32))


def _ring_write(cache: RingCache, k: jax.Array, v: jax.Array) -> RingCache:
  """The cache after the t new keys and values k, v [b, t, H, Dh]: the last min(t, W) in their slots."""
  t, window = k.shape[1], cache.k.shape[1]
  kept = min(t, window)
  slots = (cache.count[:, None] + jnp.arange(t - kept, t, dtype=jnp.int32)) % window  # [b, kept], distinct
  put = jax.vmap(lambda ring, slot, new: ring.at[slot].set(new))
  return RingCache(put(cache.k, slots, k[:, t - kept:].astype(cache.k.dtype)),
                   put(cache.v, slots, v[:, t - kept:].astype(cache.v.dtype)), cache.count + t)
