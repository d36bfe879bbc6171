"""Hugging Face `datasets` as a corpus: a directory written by `save_to_disk`, local .parquet / .arrow files
(a path or glob), or a hub name (which needs network access).

`datasets` is imported in the functions that use it: it takes about a second to import.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterator

from yanjax.data.documents import Document, ReadReport, column_texts, counted, is_text_type
from yanjax.data.errors import CorpusError

_BATCH_ROWS = 1024
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes (a DatasetDict, a Dataset)
_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}


@dataclasses.dataclass(frozen=True)
class DatasetRows:
  """Rows [start, stop) of a Hugging Face dataset."""

  dataset: str  # as the user gave it: a save_to_disk directory, a file/glob of .parquet or .arrow files, or a hub name
  config: str | None
  split: str
  start: int
  stop: int


@functools.lru_cache(maxsize=16)
def load(dataset: str, config: str | None, split: str):
  """The `datasets.Dataset` of `split` (memory-mapped; cached, so a process loads each dataset once).

  A `save_to_disk` Dataset is used whole, unless it records a different split.
  """
  import datasets  # pylint: disable=import-outside-toplevel
  name = _name(dataset, config, split)
  if any(os.path.isfile(os.path.join(dataset, marker)) for marker in _SAVED_MARKERS):
    try:
      loaded = datasets.load_from_disk(dataset)
    except Exception as error:  # pylint: disable=broad-except  # every failure becomes one line
      raise CorpusError(f"cannot load {name}: {_first_line(error)}; save it again with save_to_disk") from error
    if isinstance(loaded, datasets.DatasetDict):
      if split not in loaded:
        raise CorpusError(f"{dataset} has no split {split!r} (it has {sorted(loaded)}); pass --hf_split=<one of them>")
      return loaded[split]
    if loaded.split is not None and str(loaded.split) != split:
      raise CorpusError(f"{dataset} holds the split {str(loaded.split)!r}, not {split!r}; "
                        f"pass --hf_split={loaded.split}")
    return loaded
  builder = next((b for suffix, b in _FILE_BUILDERS.items() if dataset.endswith(suffix)), None)
  try:
    if builder:
      return datasets.load_dataset(builder, data_files=dataset, split="train")
    return datasets.load_dataset(dataset, config, split=split)
  except Exception as error:  # pylint: disable=broad-except  # every failure becomes one line
    fix = ("check the path or glob" if builder else "a hub name needs network access; offline, save the dataset "
           "with save_to_disk and pass its directory")
    raise CorpusError(f"cannot load the Hugging Face dataset {name}: {_first_line(error)}; {fix}") from error


def describe(dataset: str, config: str | None, split: str) -> tuple[int, int, str]:
  """(rows, bytes, version) of a dataset split; the version (its fingerprint) changes when the data does."""
  ds = load(dataset, config, split)
  return ds.num_rows, ds.data.nbytes, ds._fingerprint  # pylint: disable=protected-access


def read_rows(part: DatasetRows, text_field: str, report: ReadReport) -> Iterator[Document]:
  """The documents of rows [part.start, part.stop), read in Arrow batches; counted in `report`.

  Raises CorpusError when the dataset has no text column `text_field`.
  """
  ds = load(part.dataset, part.config, part.split)
  name = _name(part.dataset, part.config, part.split)
  if text_field not in ds.column_names:
    raise CorpusError(f"{name}: no column {text_field!r} (it has {ds.column_names[:10]}); "
                      "pass --text_field=<the column holding the text>")
  column_type = ds.data.schema.field(text_field).type
  if not is_text_type(column_type):
    raise CorpusError(f"{name}: column {text_field!r} has type {column_type}, not text; "
                      "pass --text_field=<a text column>")
  table = ds.with_format("arrow", columns=[text_field])

  def texts():
    stop = min(part.stop, ds.num_rows)
    for start in range(part.start, stop, _BATCH_ROWS):
      yield from column_texts(table[start:min(start + _BATCH_ROWS, stop)].column(0), start, name, report)

  return counted(texts(), report)


def _name(dataset: str, config: str | None, split: str) -> str:
  """How messages name a dataset split: "dataset[split]", or "dataset[config, split]"."""
  return f"{dataset}[{config}, {split}]" if config else f"{dataset}[{split}]"


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
