"""Writing and verifying one shard of a split: `<split dir>/<shard>/tokens` and `doc_offsets`.

A preparation task writes one shard per split for its input shard (yanjax.data.prepare). The token arrays are
zarr3 with the sharding codec: zarr shards of 2^23 tokens keep the file count low at terabyte scale, and inner
chunks of 2^15 tokens (64 KiB as uint16) keep a random window read to one or two small chunks. The writer
hashes what it writes (sha256 of the little-endian bytes), so a resumed preparation can verify a shard by
reading it back (`verify`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import tensorstore as ts
from etils import epath

from yanjax.core import storage
from yanjax.data import store as store_format

_TOKEN_SHARD, _TOKEN_CHUNK = 1 << 23, 1 << 15
_OFFSET_SHARD, _OFFSET_CHUNK = 1 << 20, 1 << 14
_VERIFY_READ = 1 << 24  # elements read back at once by `verify`


def _zarr3_spec(path: epath.Path, dtype: np.dtype, shard: int, chunk: int) -> dict[str, Any]:
  """A resizable 1-D zarr3 array of `dtype`, sharded, zstd-compressed inner chunks."""
  return {
      "driver": "zarr3",
      "kvstore": storage.kvstore(path),
      "metadata": {
          "shape": [0],
          "data_type": dtype.name,
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard]}},
          "codecs": [{
              "name": "sharding_indexed",
              "configuration": {
                  "chunk_shape": [chunk],
                  "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                             {"name": "zstd", "configuration": {"level": 1}}],
                  "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                   {"name": "crc32c"}],
              },
          }],
      },
  }


class ArrayAppender:
  """Grows a 1-D zarr3 array by appends, writing only whole zarr shards until `finish`; hashes the values."""

  def __init__(self, path: epath.Path, dtype: np.dtype, shard: int, chunk: int):
    self._array = ts.open(_zarr3_spec(path, dtype, shard, chunk), create=True, delete_existing=True).result()
    self._dtype = dtype
    self._shard = shard
    self._pending: list[np.ndarray] = []
    self._pending_size = 0
    self._written = 0
    self.sha256 = hashlib.sha256()

  def append(self, values: np.ndarray):
    values = np.asarray(values, self._dtype)
    self.sha256.update(values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes())
    self._pending.append(values)
    self._pending_size += len(values)
    if self._pending_size >= self._shard:
      self._flush(whole_shards_only=True)

  def finish(self) -> int:
    """Writes what is pending; returns the array's final length."""
    self._flush(whole_shards_only=False)
    return self._written

  def _flush(self, whole_shards_only: bool):
    pending = np.concatenate(self._pending) if self._pending else np.zeros(0, self._dtype)
    count = len(pending) // self._shard * self._shard if whole_shards_only else len(pending)
    if count:
      end = self._written + count
      self._array = self._array.resize(exclusive_max=[end], expand_only=True).result()
      self._array[self._written:end].write(pending[:count]).result()
      self._written = end
    self._pending = [pending[count:]]
    self._pending_size = len(pending) - count


class ShardWriter:
  """The token array and document offsets of one shard of one split; nothing is written for no documents."""

  def __init__(self, directory: epath.Path, dtype: np.dtype):
    self.directory = directory
    self.dtype = dtype
    self._arrays: tuple[ArrayAppender, ArrayAppender] | None = None
    self.num_tokens = 0
    self.num_documents = 0

  def add(self, documents: list[np.ndarray]):
    """Appends documents, each a 1-D array of token ids (bos and eos included)."""
    if not documents:
      return
    tokens, offsets = self._arrays or self._create()
    lengths = np.fromiter((len(d) for d in documents), np.int64, len(documents))
    tokens.append(np.concatenate(documents))
    offsets.append(self.num_tokens + np.cumsum(lengths))
    self.num_tokens += int(lengths.sum())
    self.num_documents += len(documents)

  def _create(self) -> tuple[ArrayAppender, ArrayAppender]:
    if not storage.is_remote(self.directory):  # object stores have no directories
      self.directory.mkdir(parents=True, exist_ok=True)
    self._arrays = (
        ArrayAppender(self.directory / store_format.TOKENS_ARRAY, self.dtype, _TOKEN_SHARD, _TOKEN_CHUNK),
        ArrayAppender(self.directory / store_format.OFFSETS_ARRAY, np.dtype(np.int64), _OFFSET_SHARD,
                      _OFFSET_CHUNK))
    self._arrays[1].append(np.zeros(1, np.int64))
    return self._arrays

  def finish(self) -> dict[str, Any]:
    """Flushes both arrays; returns the shard's entry: name, sizes and the sha256 of both arrays."""
    entry = {"name": self.directory.name, "num_tokens": self.num_tokens, "num_documents": self.num_documents}
    if self._arrays is None:
      return entry
    tokens, offsets = self._arrays
    assert tokens.finish() == self.num_tokens and offsets.finish() == self.num_documents + 1
    return {**entry, "tokens_sha256": tokens.sha256.hexdigest(), "offsets_sha256": offsets.sha256.hexdigest()}


def verify(directory: epath.Path, entry: dict[str, Any]) -> str | None:
  """None when the shard at `directory` holds what `entry` (from `ShardWriter.finish`) says; else why not."""
  if entry["num_documents"] == 0:
    return None
  expected = {store_format.TOKENS_ARRAY: (entry["num_tokens"], entry["tokens_sha256"]),
              store_format.OFFSETS_ARRAY: (entry["num_documents"] + 1, entry["offsets_sha256"])}
  for name, (length, digest) in expected.items():
    try:
      array = ts.open({"driver": "zarr3", "kvstore": storage.kvstore(directory / name)}, read=True,
                      open=True).result()
    except ValueError as e:
      return f"{directory / name} cannot be opened ({e})"
    if array.shape != (length,):
      return f"{directory / name} has shape {array.shape}, expected ({length},)"
    sha256 = hashlib.sha256()
    for start in range(0, length, _VERIFY_READ):
      try:
        values = array[start:min(start + _VERIFY_READ, length)].read().result()
      except ValueError as e:
        return f"{directory / name} cannot be read ({e})"
      sha256.update(values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes())
    if sha256.hexdigest() != digest:
      return f"{directory / name} differs from its checksum"
  return None
