"""The batch loader: each batch is a pure function of (seed, step); each process reads its own rows.

Row r of batch `step` is global row step * B + r: that row of the (grain) mixture of the stores' sources;
process i of `process_count` takes rows i b ... (i + 1) b - 1 of every global batch, b = B / process_count. A
row does not depend on the process count, so shares are disjoint, together complete, and a resumed run needs
only the step. Shapes: the legend in docs/model.md (b: the rows of this process).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import grain
import numpy as np

from yanjax.data.errors import DataError, SequenceLengthError, TokenizerMismatchError
from yanjax.data.packing import DocumentRows, PackedSequences
from yanjax.data.store import Store, open_store

DEFAULT_MAX_IN_MEMORY_BYTES = 1 << 30  # splits up to this size are read into memory once


class Loader:
  """Batches of b rows of T tokens for one process; see `make_loader`."""

  def __init__(self, rows: grain.MapDataset, stores: list[Store], seq_len: int, global_batch: int,
               process_index: int, process_count: int):
    self.stores = stores
    self.seq_len = seq_len
    self.global_batch = global_batch
    self.process_index = process_index
    self.process_count = process_count
    self.local_batch = global_batch // process_count
    self._rows = rows

  @property
  def vocab_size(self) -> int:
    return self.stores[0].vocab_size

  @property
  def tokenizer_path(self) -> os.PathLike:
    """The first store's tokenizer.model (an epath: local, gs:// or s3://)."""
    return self.stores[0].tokenizer_path

  def tokenizer_bytes(self) -> bytes:
    """The serialized sentencepiece model all the stores share (verified against its sha256)."""
    return self.stores[0].tokenizer_bytes()

  @property
  def tokenizer_sha256(self) -> str:
    return self.stores[0].tokenizer_sha256

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step`: "inputs", "targets", "segment_ids", "positions"
    int32 [b, T] and "loss_mask" float32 [b, T]."""
    if step < 0:
      raise DataError(f"step must be >= 0, got {step}")
    first = step * self.global_batch + self.process_index * self.local_batch
    # grain's batched-read path: one vectorised read per store instead of one per row.
    rows = self._rows._getitems(range(first, first + self.local_batch))  # pylint: disable=protected-access
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

  def iterate(self, start_step: int = 0, num_threads: int = 2,
              prefetch_batches: int = 4) -> grain.IterDataset:
    """Batches `start_step`, `start_step + 1`, ..., computed ahead on grain reader threads."""
    return grain.MapDataset.range(start_step, sys.maxsize).map(self.batch).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches))


def make_loader(stores: Sequence[str | os.PathLike | Store], weights: Sequence[float] | None = None,
                split: str = "train", *, seq_len: int, global_batch: int, seed: int = 0,
                process_index: int = 0, process_count: int = 1, packing: bool = True,
                expected_vocab_size: int | None = None, expected_tokenizer_sha256: str | None = None,
                max_in_memory_bytes: int = DEFAULT_MAX_IN_MEMORY_BYTES) -> Loader:
  """A loader over `split` of `stores` (opened stores, local paths or gs:// / s3:// URLs), mixed by
  `weights` (default equal) in grain's deterministic interleaving.

  packing=True packs shuffled documents into windows of T + 1 tokens (`PackedSequences`);
  packing=False gives one padded document prefix per row (`DocumentRows`). The expected_* arguments
  are checked against every store so a run never trains on ids of another tokenizer.
  """
  _check_layout(seq_len, global_batch, seed, process_index, process_count)
  if not stores:
    raise DataError("make_loader needs at least one store")
  if weights is not None and (len(weights) != len(stores) or min(weights) <= 0):
    raise DataError(f"weights {list(weights)} must be one positive number per store ({len(stores)})")
  opened = [s if isinstance(s, Store) else open_store(s) for s in stores]
  _check_tokenizer(opened, expected_vocab_size, expected_tokenizer_sha256)
  source_class = PackedSequences if packing else DocumentRows
  datasets = []
  for stream, store in enumerate(opened):
    store_split = store.split(split)
    _check_fill(store, store_split.doc_offsets, split, seq_len, global_batch, packing)
    source = source_class(store_split.doc_offsets, store_split.reader(max_in_memory_bytes), seq_len,
                          seed, stream)
    datasets.append(grain.MapDataset.source(source))
  rows = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
  return Loader(rows, opened, seq_len, global_batch, process_index, process_count)


def _check_layout(seq_len: int, global_batch: int, seed: int, process_index: int, process_count: int):
  if seq_len <= 0 or global_batch <= 0 or seed < 0:
    raise DataError(f"seq_len ({seq_len}) and global_batch ({global_batch}) must be positive and "
                    f"seed ({seed}) non-negative")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} must be in [0, process_count={process_count})")
  if global_batch % process_count:
    raise DataError(f"global_batch {global_batch} must be divisible by process_count {process_count}")


def _check_tokenizer(stores: list[Store], expected_vocab_size: int | None,
                     expected_sha256: str | None):
  hashes = {store.tokenizer_sha256 for store in stores}
  if len(hashes) > 1:
    listing = ", ".join(f"{s.path}: {s.tokenizer_sha256[:12]}" for s in stores)
    raise TokenizerMismatchError(f"the stores were prepared with different tokenizers ({listing}); "
                                 "re-prepare them with one --tokenizer_model")
  for store in stores:
    if expected_sha256 is not None and store.tokenizer_sha256 != expected_sha256:
      raise TokenizerMismatchError(
          f"{store.path} was prepared with tokenizer {store.tokenizer_sha256[:12]}..., but the run asks "
          f"for {expected_sha256[:12]}...; re-prepare it with --tokenizer_model <the run's tokenizer> "
          "or point the run at a store of its tokenizer")
    if expected_vocab_size is not None and store.vocab_size != expected_vocab_size:
      raise TokenizerMismatchError(
          f"{store.path} has a vocabulary of {store.vocab_size} but the model expects "
          f"{expected_vocab_size}; set the model's vocab_size to {store.vocab_size} or re-prepare "
          f"with --vocab_size={expected_vocab_size}")


def _check_fill(store: Store, doc_offsets: np.ndarray, split: str, seq_len: int, global_batch: int,
                packing: bool):
  """SequenceLengthError when the split cannot fill one global batch of distinct rows."""
  num_tokens, num_docs = int(doc_offsets[-1]), len(doc_offsets) - 1
  where = f"the {split} split of {store.path} ({num_docs} documents, {num_tokens} tokens)"
  if packing and num_tokens - 1 < global_batch * seq_len:
    raise SequenceLengthError(
        f"{where} cannot fill one global batch of {global_batch} x {seq_len} packed tokens (needs "
        f"{global_batch * seq_len + 1}); lower seq_len or global_batch, or prepare more data")
  if not packing:
    longest = int(np.diff(doc_offsets).max(initial=0))
    if num_docs < global_batch or longest < seq_len + 1:
      raise SequenceLengthError(
          f"{where} cannot fill unpacked rows: it needs >= {global_batch} documents (global_batch) and "
          f"one of >= {seq_len + 1} tokens (longest: {longest}); lower seq_len or global_batch, or "
          "use packing=True")
