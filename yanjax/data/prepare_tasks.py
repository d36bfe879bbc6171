"""The tasks of a preparation, each run on a Ray worker for one input shard (unit); see yanjax.data.prepare.

`SampleTask` draws the unit's share of the tokenizer's training text, `DigestTask` hashes its documents for
exact dedup, and `TokenizeTask` writes its shard of each split and then its record `units/<unit>.json`,
last. A re-run finds the record, verifies the shards against its checksums and keeps them; a task whose
worker died before the record was written is run again from the start (its partial shards are replaced).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import resource
import socket
import time
from typing import Any, Iterator

import numpy as np

from yanjax.core import storage
from yanjax.data import content, shard_writer, sources
from yanjax.data import store as store_format
from yanjax.data import tokenizer as tokenizers
from yanjax.data.errors import TokenizerMismatchError
from yanjax.data.units import Unit

_BATCH_CHARS = 1 << 20  # text encoded at once
_TOKENIZERS: dict[str, tokenizers.Tokenizer] = {}  # by sha256: loaded once per worker process


@dataclasses.dataclass(frozen=True)
class ReadSettings:
  """How documents are read from the inputs (the flags of the same names)."""
  text_field: str
  text_sample_by: str
  on_bad_input: str


def read_unit(unit: Unit, read: ReadSettings, report: sources.ReadReport) -> Iterator[sources.Document]:
  """The unit's non-empty documents, in order."""
  for part in unit.parts:
    yield from sources.read_documents(part, read.text_field, read.text_sample_by, report)


def item(unit: Unit, **fields: Any) -> dict[str, Any]:
  """The Ray Data row of a task on `unit`: the unit itself (pickled), so a task carries no other unit."""
  return {"unit": pickle.dumps(unit), **fields}


def _unit(row: dict[str, Any]) -> Unit:
  return pickle.loads(row["unit"])


@dataclasses.dataclass(frozen=True)
class SampleTask:
  """item -> (unit index, training sentences from its first documents: its share of `budget_bytes`)."""
  read: ReadSettings
  budget_bytes: int
  total_bytes: int  # of every unit

  def __call__(self, row: dict[str, Any]) -> tuple[int, list[str]]:
    unit = _unit(row)
    share = max(1, self.budget_bytes * unit.num_bytes // max(self.total_bytes, 1))
    texts = (d.text for d in read_unit(unit, self.read, sources.ReadReport(self.read.on_bad_input)))
    return unit.index, tokenizers.sample_sentences(texts, share)


@dataclasses.dataclass(frozen=True)
class DigestTask:
  """item -> (unit index, the content digests of its documents: uint8 [n, content.DIGEST_BYTES])."""
  read: ReadSettings

  def __call__(self, row: dict[str, Any]) -> tuple[int, np.ndarray]:
    unit = _unit(row)
    digests = b"".join(content.digest(d.text) for d in
                       read_unit(unit, self.read, sources.ReadReport(self.read.on_bad_input)))
    return unit.index, np.frombuffer(digests, np.uint8).reshape(-1, content.DIGEST_BYTES)


@dataclasses.dataclass(frozen=True)
class TokenizeTask:
  """item(unit, repeated=int64 bytes of the document indices dedup removes) -> the unit's record."""
  read: ReadSettings
  temp_dir: str  # the store being built
  fingerprint: str
  tokenizer_data: bytes
  token_dtype: str
  seed: int
  validation_fraction: float

  def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
    unit = _unit(row)
    root = storage.as_path(self.temp_dir)
    kept = self._verified_record(root, unit)
    if kept is not None:
      return {**kept, "resumed": True}
    start = time.time()
    for split in store_format.SPLITS:  # what an attempt killed before its record was written left
      storage.remove_tree(root / split / unit.name, missing_ok=True)
    tokenizer = _tokenizer(self.tokenizer_data)
    writers = {split: shard_writer.ShardWriter(root / split / unit.name, np.dtype(self.token_dtype))
               for split in store_format.SPLITS}
    report = sources.ReadReport(self.read.on_bad_input)
    repeated = set(np.frombuffer(row["repeated"], np.int64).tolist())
    batch, chars = [], 0
    for index, document in enumerate(read_unit(unit, self.read, report)):
      if index in repeated:
        continue
      batch.append(document)
      chars += len(document.text)
      if chars >= _BATCH_CHARS:
        self._write(batch, tokenizer, writers)
        batch, chars = [], 0
    self._write(batch, tokenizer, writers)
    record = {
        "unit": unit.index, "fingerprint": self.fingerprint, "inputs": unit.describe(),
        "splits": {split: writer.finish() for split, writer in writers.items()},
        "report": dataclasses.asdict(report), "duplicates_removed": len(repeated),
        "seconds": time.time() - start, "worker": f"{socket.gethostname()}:{os.getpid()}",
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    storage.write_atomic(root / store_format.UNITS_DIR / f"{unit.name}.json", json.dumps(record, indent=1))
    return {**record, "resumed": False}

  def _verified_record(self, root, unit: Unit) -> dict[str, Any] | None:
    """The unit's record when an earlier run wrote it and its shards match their checksums."""
    path = root / store_format.UNITS_DIR / f"{unit.name}.json"
    try:
      record = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
      return None
    if record.get("fingerprint") != self.fingerprint:
      return None
    problems = [shard_writer.verify(root / split / unit.name, entry) for split, entry in record["splits"].items()]
    return None if any(problems) else record

  def _write(self, batch: list[sources.Document], tokenizer: tokenizers.Tokenizer,
             writers: dict[str, shard_writer.ShardWriter]):
    """Encodes `batch` and appends each document to its split."""
    if not batch:
      return
    routed: dict[str, list[np.ndarray]] = {split: [] for split in writers}
    for document, ids in zip(batch, tokenizer.encode_documents([d.text for d in batch])):
      if len(ids) and int(ids.max()) >= tokenizer.vocab_size:
        raise TokenizerMismatchError(f"{document.where}: the tokenizer produced id {int(ids.max())}, outside its "
                                     f"vocabulary of {tokenizer.vocab_size}; the tokenizer file is inconsistent")
      held_out = content.is_validation(self.seed, content.digest(document.text), self.validation_fraction)
      routed["validation" if held_out else "train"].append(ids)
    for split, documents in routed.items():
      writers[split].add(documents)


def _tokenizer(data: bytes) -> tokenizers.Tokenizer:
  key = hashlib.sha256(data).hexdigest()
  if key not in _TOKENIZERS:
    _TOKENIZERS[key] = tokenizers.from_bytes(data, "the store's tokenizer")
  return _TOKENIZERS[key]
