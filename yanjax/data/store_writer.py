"""Writing a token store atomically: build it in `<out>.tmp-<random>`, publish it with metadata.json last.

`<out>` is a local directory or an object-store prefix (gs://, s3://). On local disk the finished
temporary directory is renamed into place in one `os.replace`. Object stores have no directory rename:
the objects are copied server-side to `<out>`, metadata.json last (a store without it is never trusted),
then the temporary prefix is deleted. Replacing a store deletes its metadata.json first.

The layout and metadata fields are those `yanjax.data.store` reads (see docs/data.md). Token arrays are
zarr3 with the sharding codec: shards of 2^23 tokens keep the file count low at terabyte scale, and
inner chunks of 2^15 tokens (64 KiB as uint16) keep a random window read to one or two small chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from typing import Any

import numpy as np
import tensorstore as ts
from etils import epath

from yanjax.core import storage
from yanjax.data import store as store_format
from yanjax.data import tokenizer
from yanjax.data.errors import StoreError

_TOKEN_SHARD, _TOKEN_CHUNK = 1 << 23, 1 << 15
_OFFSET_SHARD, _OFFSET_CHUNK = 1 << 20, 1 << 14


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
  """Grows a 1-D zarr3 array by appends, writing only whole shards until `finish`."""

  def __init__(self, path: epath.Path, dtype: np.dtype, shard: int, chunk: int):
    self._array = ts.open(_zarr3_spec(path, dtype, shard, chunk), create=True).result()
    self._dtype = dtype
    self._shard = shard
    self._pending: list[np.ndarray] = []
    self._pending_size = 0
    self._written = 0

  def append(self, values: np.ndarray):
    self._pending.append(np.asarray(values, self._dtype))
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


class SplitWriter:
  """The token array and document offsets of one split."""

  def __init__(self, directory: epath.Path, dtype: np.dtype):
    if not storage.is_remote(directory):  # object stores have no directories
      directory.mkdir()
    self._tokens = ArrayAppender(directory / store_format.TOKENS_ARRAY, dtype, _TOKEN_SHARD,
                                 _TOKEN_CHUNK)
    self._offsets = ArrayAppender(directory / store_format.OFFSETS_ARRAY, np.dtype(np.int64),
                                  _OFFSET_SHARD, _OFFSET_CHUNK)
    self._offsets.append(np.zeros(1, np.int64))
    self.num_tokens = 0
    self.num_documents = 0

  def add(self, documents: list[np.ndarray]):
    """Appends documents, each a 1-D array of token ids (bos and eos included)."""
    if not documents:
      return
    lengths = np.fromiter((len(d) for d in documents), np.int64, len(documents))
    self._tokens.append(np.concatenate(documents))
    self._offsets.append(self.num_tokens + np.cumsum(lengths))
    self.num_tokens += int(lengths.sum())
    self.num_documents += len(documents)

  def finish(self) -> dict[str, int]:
    """Flushes both arrays; returns this split's metadata entry."""
    assert self._tokens.finish() == self.num_tokens
    assert self._offsets.finish() == self.num_documents + 1
    return {"num_tokens": self.num_tokens, "num_documents": self.num_documents}


class StoreBuilder:
  """Builds a store in a temporary sibling `<out>.tmp-<random>` of `out` and publishes it (see above).

  `out` is a local path or a gs:// / s3:// URL. Use as a context manager: leaving the block by an
  exception removes the temporary directory. A process killed outright leaves `<out>.tmp-<random>`
  behind, which `open_store` never trusts.
  """

  def __init__(self, out: str | os.PathLike, tokenizer_model: bytes):
    processor = tokenizer.load(tokenizer_model)
    self.tokenizer_metadata = {
        "file": store_format.TOKENIZER_FILE,
        "sha256": hashlib.sha256(tokenizer_model).hexdigest(),
        "vocab_size": processor.vocab_size(),
        "unk_id": processor.unk_id(),
        "bos_id": processor.bos_id(),
        "eos_id": processor.eos_id(),
    }
    self.dtype = store_format.token_dtype(processor.vocab_size())
    self.out = out = store_format.store_path(out)
    if storage.is_bucket_root(out):
      raise StoreError(f"{out} is a bucket; a store needs a path inside it, such as {out}/stores/name")
    self.temp_dir = out.parent / f"{out.name}{store_format.TEMP_MARKER}{secrets.token_hex(4)}"
    if not storage.is_remote(out):  # on object stores mkdir would create a missing bucket
      out.parent.mkdir(parents=True, exist_ok=True)
      self.temp_dir.mkdir()
    (self.temp_dir / store_format.TOKENIZER_FILE).write_bytes(tokenizer_model)
    self.splits = {name: SplitWriter(self.temp_dir / name, self.dtype) for name in store_format.SPLITS}

  def __enter__(self) -> StoreBuilder:
    return self

  def __exit__(self, exc_type, exc, traceback):
    if exc_type is not None:
      storage.remove_tree(self.temp_dir, missing_ok=True)

  def publish(self, metadata: dict[str, Any], overwrite: bool):
    """Completes `metadata` (format, tokenizer, token dtype, split sizes), writes it last, moves the
    store into place."""
    metadata = {
        **metadata,
        "tokenizer": {**metadata.get("tokenizer", {}), **self.tokenizer_metadata},
        "format": store_format.FORMAT_NAME,
        "format_version": store_format.FORMAT_VERSION,
        "token_dtype": self.dtype.name,
        "splits": {name: writer.finish() for name, writer in self.splits.items()},
    }
    text = json.dumps(metadata, indent=2, sort_keys=True)
    if storage.is_remote(self.temp_dir):
      (self.temp_dir / store_format.METADATA_FILE).write_text(text)  # one PUT: never half-visible
    else:
      partial = self.temp_dir / f"{store_format.METADATA_FILE}.partial"
      with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
      os.replace(partial, self.temp_dir / store_format.METADATA_FILE)
    replace_directory(self.temp_dir, self.out, overwrite)


STORE_ENTRIES = (store_format.METADATA_FILE, f"{store_format.METADATA_FILE}.partial", store_format.TOKENIZER_FILE,
                 *store_format.SPLITS)  # the top level of a store, finished or not


def foreign_entries(directory: epath.Path) -> list[str]:
  """Names at the top of `directory` that a token store does not have (empty: yanjax may replace it)."""
  return storage.foreign_entries(directory, STORE_ENTRIES)


def replace_directory(source: epath.Path, target: epath.Path, overwrite: bool):
  """Moves the finished store `source` to `target` (`storage.replace_directory`, metadata.json last); an
  existing `target` is replaced only with `overwrite`, and only when it holds nothing but a token store."""
  storage.forget_listings(target)
  if target.exists():
    if not overwrite:
      raise StoreError(f"{target} exists; pass --overwrite to replace it")
    if foreign_entries(target):
      raise StoreError(f"{target} holds files that are not part of a token store; it is never replaced")
  try:
    storage.replace_directory(source, target, store_format.METADATA_FILE)
  except Exception as e:  # pylint: disable=broad-except  # gcsfs and botocore errors are not all OSErrors
    raise StoreError(f"publishing {target} failed: {storage.describe_storage_error(e, target)}; "
                     "re-run data_pipelines.prepare with --overwrite") from e
