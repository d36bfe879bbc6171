"""Rows of one store split as grain random-access sources: packed windows, or one document per row.

Row `i` of a source is a pure function of (seed, stream, i): epoch i // rows_per_epoch uses a
document order and a window order drawn from `np.random.default_rng((seed, stream, epoch))`, so epochs
repeat with a fresh shuffle and any row can be computed without the ones before it.

Every row is a dict of [T] arrays: "inputs", "targets" (int32), "segment_ids" (int32, 1, 2, ... per
document in the row, 0 on padding), "positions" (int32, 0 at each document start) and "loss_mask"
(float32, 0 where the target is padding or belongs to another document than the input).
Shapes: the legend in docs/model.md; here n = rows read at once, M = documents in the split.
"""

from __future__ import annotations

import abc
import functools
import sys
from typing import Callable, NamedTuple, Sequence

import numpy as np

ReadTokens = Callable[[np.ndarray], np.ndarray]  # token positions (any shape) -> int32 ids


def _empty_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
  int_keys = ("inputs", "targets", "segment_ids", "positions")
  return {**{key: np.zeros((n, seq_len), np.int32) for key in int_keys},
          "loss_mask": np.zeros((n, seq_len), np.float32)}


class _SplitRows(abc.ABC):
  """A grain random-access source (with batched reads) of endless rows over one split's documents.

  Subclasses set `rows_per_epoch` and define `_layout(epoch)` (cached as `layout`) and
  `_rows(layout, rows_in_epoch)`.
  """

  rows_per_epoch: int

  def __init__(self, doc_offsets: np.ndarray, read_tokens: ReadTokens, seq_len: int, seed: int,
               stream: int):
    self._starts = doc_offsets[:-1]  # [M]
    self._lengths = np.diff(doc_offsets)  # [M]
    self._read_tokens = read_tokens
    self._seq_len = seq_len
    self._seed = seed
    self._stream = stream
    self.layout = functools.lru_cache(maxsize=4)(self._layout)

  def __len__(self) -> int:
    return sys.maxsize  # epochs repeat without end

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self._getitems([index])[0]

  def _getitems(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Rows for `indices`, computed together per epoch (grain's batched-read protocol)."""
    indices = np.asarray(indices, np.int64)
    out = _empty_rows(len(indices), self._seq_len)
    epochs, within = np.divmod(indices, self.rows_per_epoch)
    for epoch in np.unique(epochs):
      selected = epochs == epoch
      for key, value in self._rows(self.layout(int(epoch)), within[selected]).items():
        out[key][selected] = value
    return [{key: value[i] for key, value in out.items()} for i in range(len(indices))]

  def _rng(self, epoch: int) -> np.random.Generator:
    return np.random.default_rng((self._seed, self._stream, epoch))

  @abc.abstractmethod
  def _layout(self, epoch: int):
    """The shuffles of `epoch`."""

  @abc.abstractmethod
  def _rows(self, layout, rows: np.ndarray) -> dict[str, np.ndarray]:
    """{key: [n, T]} for rows `rows` [n] of the epoch laid out by `layout`."""


class PackedLayout(NamedTuple):
  """One epoch of packed windows."""

  document_order: np.ndarray  # [M] documents in stream order
  window_order: np.ndarray  # [rows_per_epoch] window of each row
  stream_starts: np.ndarray  # [M + 1] stream offset of each document in stream order
  store_starts: np.ndarray  # [M] store offset of each document in stream order


class PackedSequences(_SplitRows):
  """Windows of T + 1 tokens over the epoch's shuffled concatenation of documents, stride T.

  Window j covers stream[j*T : j*T + T + 1]: inputs are its first T tokens, targets its last T, so every
  token but the stream's first is a target once per epoch. A document cut by a window edge continues in
  another row as a new segment whose positions restart at 0. The stream's last (tokens - 1) % T tokens are
  left out of that epoch; the next epoch's shuffle leaves out others.
  """

  def __init__(self, doc_offsets: np.ndarray, read_tokens: ReadTokens, seq_len: int, seed: int,
               stream: int):
    super().__init__(doc_offsets, read_tokens, seq_len, seed, stream)
    self.rows_per_epoch = (int(doc_offsets[-1]) - 1) // seq_len

  def _layout(self, epoch: int) -> PackedLayout:
    rng = self._rng(epoch)
    order = rng.permutation(len(self._lengths))
    stream_starts = np.zeros(len(order) + 1, np.int64)
    np.cumsum(self._lengths[order], out=stream_starts[1:])
    return PackedLayout(order, rng.permutation(self.rows_per_epoch), stream_starts,
                        self._starts[order])

  def _rows(self, layout: PackedLayout, rows: np.ndarray) -> dict[str, np.ndarray]:
    first = layout.window_order[rows] * self._seq_len  # [n]
    stream = first[:, None] + np.arange(self._seq_len + 1)  # [n, T+1]
    doc = np.searchsorted(layout.stream_starts, stream, side="right") - 1  # [n, T+1]
    doc_start = layout.stream_starts[doc]
    tokens = self._read_tokens(layout.store_starts[doc] + stream - doc_start)
    positions = stream - np.maximum(doc_start, first[:, None])
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": (doc - doc[:, :1] + 1)[:, :-1],
        "positions": positions[:, :-1],
        "loss_mask": doc[:, :-1] == doc[:, 1:],
    }


class DocumentRows(_SplitRows):
  """One document per row in the epoch's shuffled order: its first T + 1 tokens, padded with 0."""

  def __init__(self, doc_offsets: np.ndarray, read_tokens: ReadTokens, seq_len: int, seed: int,
               stream: int):
    super().__init__(doc_offsets, read_tokens, seq_len, seed, stream)
    self.rows_per_epoch = len(self._lengths)

  def _layout(self, epoch: int) -> np.ndarray:
    """Document order [M] of `epoch`."""
    return self._rng(epoch).permutation(self.rows_per_epoch)

  def _rows(self, layout: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    docs = layout[rows]  # [n]
    offset = np.arange(self._seq_len + 1)  # [T+1]
    length = self._lengths[docs][:, None]  # [n, 1]
    valid = offset < length  # [n, T+1]
    positions = self._starts[docs][:, None] + np.minimum(offset, length - 1)
    tokens = np.where(valid, self._read_tokens(positions), 0)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": valid[:, :-1],
        "positions": np.where(valid, offset, 0)[:, :-1],
        "loss_mask": valid[:, 1:],
    }
