"""Reading a prepared token store: metadata, tokenizer, and the token arrays of each split.

A store is the directory (or object-store prefix: gs://bucket/..., s3://bucket/...) that
`python -m data_pipelines.prepare` publishes (layout in docs/data.md):

  <store>/metadata.json                 written last; without it (complete and consistent) the store is not trusted
  <store>/tokenizer.model | .json       sentencepiece model or Hugging Face tokenizer.json; sha256 in the metadata
  <store>/<split>/<shard>/tokens        zarr3 array [n_tokens] of uint16 or uint32 token ids
  <store>/<split>/<shard>/doc_offsets   zarr3 array [n_docs + 1] int64; document i is tokens[offsets[i]:offsets[i+1]]
  <store>/units/<shard>.json            what preparing that input shard read, wrote and skipped

A split is its shards in order, concatenated (the metadata lists them with their sizes and checksums).
Every document is stored as `bos_id, <tokens of its text>, eos_id`. Files are read through
`yanjax.core.storage` (epath), arrays through tensorstore's file, gcs or s3 kvstore.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable

import numpy as np
import tensorstore as ts
from etils import epath

from yanjax.core import storage
from yanjax.core.config import ConfigError
from yanjax.data import tokenizer as tokenizers
from yanjax.data.errors import StoreError

FORMAT_NAME = "yanjax-token-store"
FORMAT_VERSION = 2  # 2: splits are lists of shards; the tokenizer may be a tokenizer.json
METADATA_FILE = "metadata.json"
UNITS_DIR = "units"
TOKENS_ARRAY = "tokens"
OFFSETS_ARRAY = "doc_offsets"
SPLITS = ("train", "validation")
TEMP_MARKER = ".tmp-"  # a directory whose name holds this is an unfinished preparation
_REQUIRED_KEYS = ("format", "format_version", "fingerprint", "tokenizer", "token_dtype", "splits")
_CACHE_BYTES = 256 << 20  # tensorstore chunk cache shared by the arrays of one store


def token_dtype(vocab_size: int) -> np.dtype:
  """The narrowest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def store_path(path: str | os.PathLike) -> epath.Path:
  """The epath of a store given as a local path or gs:// / s3:// URL; StoreError for a bad URL."""
  try:
    return storage.as_path(path)
  except ConfigError as e:
    raise StoreError(str(e)) from e


def _open_array(path: epath.Path, context: ts.Context | None = None) -> ts.Future:
  """Starts opening an existing 1-D zarr3 array for reading."""
  spec = {"driver": "zarr3", "kvstore": storage.kvstore(path)}
  return ts.open(spec, read=True, open=True, context=context)


class StoreSplit:
  """One split (train or validation) of a store: its shards' token arrays and document offsets, end to end."""

  def __init__(self, name: str, directory: epath.Path, info: dict[str, Any], dtype: np.dtype, context: ts.Context):
    self.name = name
    self.num_tokens = info["num_tokens"]
    self.num_documents = info["num_documents"]
    self.shards = info["shards"]
    rerun = "the store is corrupt: re-run data_pipelines.prepare with --overwrite"
    opening = [(_open_array(directory / s["name"] / TOKENS_ARRAY, context),
                _open_array(directory / s["name"] / OFFSETS_ARRAY, context)) for s in self.shards]
    self._shard_tokens, self._shard_offsets = [], []
    for shard, (tokens, offsets) in zip(self.shards, opening):
      try:
        tokens, offsets = tokens.result(), offsets.result()
      except ValueError as e:
        raise StoreError(f"shard {shard['name']} of split {name!r} at {directory} cannot be opened ({e}); "
                         f"{rerun}") from e
      if tokens.shape != (shard["num_tokens"],) or offsets.shape != (shard["num_documents"] + 1,):
        raise StoreError(f"shard {shard['name']} of split {name!r} at {directory} has arrays of shape "
                         f"{tokens.shape} and {offsets.shape} but metadata says {shard['num_tokens']} tokens "
                         f"and {shard['num_documents']} documents; {rerun}")
      self._shard_tokens.append(tokens)
      self._shard_offsets.append(offsets)
    if (sum(s["num_tokens"] for s in self.shards), sum(s["num_documents"] for s in self.shards)) != (
        self.num_tokens, self.num_documents):
      raise StoreError(f"split {name!r} at {directory}: its shards do not add up to the metadata's "
                       f"{self.num_tokens} tokens and {self.num_documents} documents; {rerun}")
    self.tokens = (ts.concat(self._shard_tokens, axis=0) if self._shard_tokens else
                   ts.array(np.zeros(0, dtype)))

  @functools.cached_property
  def doc_offsets(self) -> np.ndarray:
    """[n_docs + 1] int64 document boundaries into `tokens` (the shards' offsets, shifted end to end)."""
    reads = [offsets.read() for offsets in self._shard_offsets]
    parts, start = [np.zeros(1, np.int64)], 0
    for read in reads:
      offsets = read.result()
      parts.append(offsets[1:] + start)
      start += int(offsets[-1])
    return np.concatenate(parts)

  def document(self, index: int) -> np.ndarray:
    """Tokens [n] int32 of document `index`, bos and eos included."""
    start, stop = self.doc_offsets[index:index + 2]
    return self.tokens[start:stop].read().result().astype(np.int32)

  def reader(self, max_in_memory_bytes: int) -> Callable[[np.ndarray], np.ndarray]:
    """A function mapping token positions (any shape, int64) to token ids (same shape, int32).

    The split is read into memory once when its tokens take at most `max_in_memory_bytes`; larger
    splits are read window by window through tensorstore's chunk cache.
    """
    if self.num_tokens * self.tokens.dtype.numpy_dtype.itemsize <= max_in_memory_bytes:
      in_memory = self.tokens.read().result()
      return lambda positions: in_memory[positions].astype(np.int32)
    return lambda positions: self.tokens.vindex[positions].read().result().astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class Store:
  """A prepared, verified token store (a local directory or an object-store prefix)."""

  path: epath.Path
  metadata: dict[str, Any]
  splits: dict[str, StoreSplit]
  tokenizer_model: bytes = dataclasses.field(repr=False)  # the verified bytes of tokenizer.model

  @property
  def vocab_size(self) -> int:
    return self.metadata["tokenizer"]["vocab_size"]

  @property
  def tokenizer_path(self) -> epath.Path:
    """tokenizer.model or tokenizer.json, as the metadata names it."""
    return self.path / self.metadata["tokenizer"]["file"]

  @property
  def tokenizer_sha256(self) -> str:
    return self.metadata["tokenizer"]["sha256"]

  @property
  def bos_id(self) -> int:
    return self.metadata["tokenizer"]["bos_id"]

  @property
  def eos_id(self) -> int:
    return self.metadata["tokenizer"]["eos_id"]

  @property
  def num_tokens(self) -> dict[str, int]:
    return {name: split.num_tokens for name, split in self.splits.items()}

  @property
  def num_documents(self) -> dict[str, int]:
    return {name: split.num_documents for name, split in self.splits.items()}

  def split(self, name: str) -> StoreSplit:
    """The `name` split ("train" or "validation")."""
    if name not in self.splits:
      raise StoreError(f"unknown split {name!r}; a store has splits {tuple(self.splits)}")
    return self.splits[name]

  def tokenizer_bytes(self) -> bytes:
    """The serialized tokenizer file (its sha256 is `tokenizer_sha256`); write it anywhere with
    `storage.as_path(dest).write_bytes(...)`."""
    return self.tokenizer_model

  def tokenizer(self) -> tokenizers.Tokenizer:
    """The store's tokenizer (sentencepiece or Hugging Face)."""
    return tokenizers.from_bytes(self.tokenizer_model, str(self.tokenizer_path))


def _storage_call(fn: Callable[[], Any], path: epath.Path, what: str) -> Any:
  """fn() within storage's deadline; a StoreError naming `path` when its storage cannot be reached or
  read (missing bucket, credentials, endpoint)."""
  try:
    return storage.run_with_deadline(fn, path, what, "check the store path, the bucket and the credentials")
  except ConfigError as e:
    raise StoreError(str(e)) from e


def _read_file(store: epath.Path, name: str) -> bytes | None:
  """The bytes of file `name` of `store`, or None when it does not exist (its bucket does)."""
  file = store / name

  def read():
    try:
      return file.read_bytes()
    except FileNotFoundError as e:
      if storage.is_remote(file) and "bucket" in str(e).lower():
        raise  # a missing bucket is a storage error, not a missing store
      return None

  return _storage_call(read, store, "token store")


def _read_metadata(path: epath.Path) -> dict[str, Any]:
  """The metadata of a finished store at `path`; StoreError when it is absent, unfinished or incomplete."""
  rerun = f"re-run `python -m data_pipelines.prepare --output {path} ...`"
  if TEMP_MARKER in path.name:
    raise StoreError(f"{path} is the temporary directory of an unfinished preparation and is never "
                     f"trusted; delete it and open the published store instead")
  if not storage.is_remote(path) and not path.is_dir():
    raise StoreError(f"no prepared store at {path}; {rerun}")
  storage.forget_listings(path)
  text = _read_file(path, METADATA_FILE)
  if text is None and storage.is_remote(path) and not _storage_call(path.exists, path, "token store"):
    raise StoreError(f"no prepared store at {path} (no object under it); {rerun}")
  try:
    if text is None:
      raise ValueError("it is missing")
    metadata = json.loads(text.decode("utf-8"))
  except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
    raise StoreError(f"{path} has no complete {METADATA_FILE} ({e}), so it is not trusted; "
                     f"{rerun} with --overwrite") from e
  if not isinstance(metadata, dict):
    raise StoreError(f"{path}/{METADATA_FILE} is not a JSON object; {rerun} with --overwrite")
  missing = [key for key in _REQUIRED_KEYS if key not in metadata]
  if missing:
    raise StoreError(f"{path}/{METADATA_FILE} lacks {missing}; {rerun} with --overwrite")
  if metadata["tokenizer"].get("file") not in tokenizers.FILE_NAMES.values():
    raise StoreError(f"{path}/{METADATA_FILE} names no tokenizer file of {sorted(tokenizers.FILE_NAMES.values())}; "
                     f"{rerun} with --overwrite")
  if (metadata["format"], metadata["format_version"]) != (FORMAT_NAME, FORMAT_VERSION):
    raise StoreError(
        f"{path} holds format {metadata['format']!r} version {metadata['format_version']}, this "
        f"library reads {FORMAT_NAME!r} version {FORMAT_VERSION}; {rerun} with --overwrite")
  return metadata


def open_store(path: str | os.PathLike) -> Store:
  """Opens and verifies the store at `path`, local or gs:// / s3:// (metadata, tokenizer hash, array
  shapes)."""
  path = store_path(path)
  metadata = _read_metadata(path)
  tokenizer_file = path / metadata["tokenizer"]["file"]
  model = _read_file(path, metadata["tokenizer"]["file"])
  if model is None or hashlib.sha256(model).hexdigest() != metadata["tokenizer"]["sha256"]:
    raise StoreError(f"{tokenizer_file} is missing or its sha256 differs from the metadata's; the store "
                     f"is corrupt: re-run data_pipelines.prepare with --overwrite")
  context = ts.Context({"cache_pool": {"total_bytes_limit": _CACHE_BYTES}})
  splits = {
      name: StoreSplit(name, path / name, info, np.dtype(metadata["token_dtype"]), context)
      for name, info in metadata["splits"].items()
  }
  if sorted(splits) != sorted(SPLITS):
    raise StoreError(f"{path} has splits {sorted(splits)}, expected {sorted(SPLITS)}; re-run "
                     "data_pipelines.prepare with --overwrite")
  return Store(path, metadata, splits, model)
