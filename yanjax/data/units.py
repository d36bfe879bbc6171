"""Input shards ("units"): the corpus cut into pieces of about equal size, each prepared by one task.

A unit is consecutive whole files (a file larger than the target is a unit of its own) or a range of rows of a
Hugging Face dataset. The cut depends only on the inputs, so a re-run, on any number of workers, cuts the same
units and can reuse the ones an interrupted run finished. Unit i writes shard `<split>/<i:06d>` of each split.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from yanjax.data.sources import DatasetRows, InputFile

MIN_UNIT_BYTES, MAX_UNIT_BYTES = 1 << 20, 256 << 20
UNITS_PER_CORPUS = 64  # the target: as many units as this, within [MIN_UNIT_BYTES, MAX_UNIT_BYTES] each


@dataclasses.dataclass(frozen=True)
class DatasetSize:
  """A Hugging Face dataset's split, as `hf_datasets.describe` measured it."""
  dataset: str
  config: str | None
  split: str
  num_rows: int
  num_bytes: int


@dataclasses.dataclass(frozen=True)
class Unit:
  """Input shard `index`: what one task reads."""
  index: int
  parts: tuple[InputFile | DatasetRows, ...]
  num_bytes: int

  @property
  def name(self) -> str:
    """The name of its shards and its record: the index, zero-padded."""
    return f"{self.index:06d}"

  def describe(self) -> list[str]:
    """Its parts, as messages and records name them."""
    return [p.url if isinstance(p, InputFile) else f"{p.dataset}[{p.split}] rows {p.start}-{p.stop}"
            for p in self.parts]


def target_bytes(total_bytes: int) -> int:
  """The input bytes a unit aims at for a corpus of `total_bytes` (when --input_shard_bytes is not given)."""
  return min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, total_bytes // UNITS_PER_CORPUS))


def plan(files: Sequence[InputFile], datasets: Sequence[DatasetSize], unit_bytes: int | None = None) -> list[Unit]:
  """The units of `files` (in order) and then of `datasets`, each of about `unit_bytes` (None: `target_bytes`)."""
  total = sum(max(f.size, 0) for f in files) + sum(d.num_bytes for d in datasets)
  target = unit_bytes or target_bytes(total)
  groups: list[tuple[tuple[InputFile | DatasetRows, ...], int]] = []
  group, size = [], 0
  for file in files:
    group.append(file)
    size += max(file.size, 0)
    if size >= target:
      groups.append((tuple(group), size))
      group, size = [], 0
  if group:
    groups.append((tuple(group), size))
  for d in datasets:
    rows = max(1, math.ceil(d.num_rows * target / max(d.num_bytes, 1)))
    for start in range(0, d.num_rows, rows):
      stop = min(start + rows, d.num_rows)
      part = DatasetRows(d.dataset, d.config, d.split, start, stop)
      groups.append(((part,), d.num_bytes * (stop - start) // max(d.num_rows, 1)))
  return [Unit(i, parts, size) for i, (parts, size) in enumerate(groups)]
