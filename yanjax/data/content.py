"""Decisions by a document's content: its digest, its split, and which copies of a repeated text go.

A document's split depends only on its text and the seed, so it is stable when files move, are renamed or
are re-sharded, and exact copies of one text always land in the same split (no copy of a validation document
is trained on).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

DIGEST_BYTES = 16  # blake2b-128: collisions stay below 1e-18 for 1e10 documents


def digest(text: str) -> bytes:
  """The blake2b-128 digest of a document's UTF-8 text."""
  return hashlib.blake2b(text.encode("utf-8"), digest_size=DIGEST_BYTES).digest()


def is_validation(seed: int, text_digest: bytes, fraction: float) -> bool:
  """Whether a document with `text_digest` is held out: a seeded hash of the digest below `fraction`."""
  draw = hashlib.blake2b(text_digest, digest_size=8, key=seed.to_bytes(8, "little")).digest()
  return int.from_bytes(draw, "little") / 2.0**64 < fraction


def repeated_copies(digests: Sequence[np.ndarray]) -> list[np.ndarray]:
  """For each input shard's digests (uint8 [n_i, DIGEST_BYTES], in document order), the indices [k_i] int64 of
  its documents whose text occurred earlier in the corpus (shards in order): the copies exact dedup removes."""
  shaped = [np.asarray(d, np.uint8).reshape(-1, DIGEST_BYTES) for d in digests]
  keys = np.ascontiguousarray(np.concatenate(shaped)).view(f"V{DIGEST_BYTES}").ravel()
  _, first = np.unique(keys, return_index=True)
  repeated = np.ones(len(keys), bool)
  repeated[first] = False
  bounds = np.cumsum([0] + [len(d) for d in shaped])
  return [np.flatnonzero(repeated[start:stop]) for start, stop in zip(bounds[:-1], bounds[1:])]
