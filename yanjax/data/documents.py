"""Documents as every corpus reader yields them (files in sources.py, Hugging Face datasets in hf_datasets.py),
and the report that counts them and applies the bad-input policy."""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import pyarrow as pa

from yanjax.data.errors import CorpusError

_MAX_EXAMPLES = 20  # skipped inputs named in the metadata; all are counted


@dataclasses.dataclass(frozen=True)
class Document:
  """One non-empty document and where it came from: "path", "path:LINE", "path row N" or
  "dataset[split] row N" (lines count from 1, rows from 0)."""

  text: str
  where: str


@dataclasses.dataclass
class ReadReport:
  """Counts what reading saw; applies the bad-input policy. Picklable, so Ray tasks return it."""

  on_bad_input: str
  documents: int = 0
  empty_documents: int = 0
  skipped: int = 0
  skipped_examples: list[str] = dataclasses.field(default_factory=list)

  def bad_input(self, where: str, error: Exception):
    """Skips and counts `where`, or raises under the "fail" policy."""
    if self.on_bad_input == "fail":
      raise CorpusError(f"cannot read {where}: {error!r}. Fix or remove it, or pass "
                        "--on_bad_input=skip to skip and count such inputs") from error
    self.skipped += 1
    if len(self.skipped_examples) < _MAX_EXAMPLES:
      self.skipped_examples.append(f"{where}: {error!r}")

  def merge(self, other: ReadReport):
    """Adds `other`'s counts to these, keeping the first examples."""
    self.documents += other.documents
    self.empty_documents += other.empty_documents
    self.skipped += other.skipped
    self.skipped_examples.extend(other.skipped_examples[:_MAX_EXAMPLES - len(self.skipped_examples)])


def counted(texts: Iterable[tuple[str, str | None]], report: ReadReport) -> Iterator[Document]:
  """Documents of (where, text) pairs; empty texts (None, or only whitespace) are counted, not yielded."""
  for where, text in texts:
    if not text or text.isspace():
      report.empty_documents += 1
    else:
      report.documents += 1
      yield Document(text, where)


def column_texts(column: pa.Array | pa.ChunkedArray, first_row: int, where: str,
                 report: ReadReport) -> Iterator[tuple[str, str | None]]:
  """(f"{where} row N", text) of a string column whose first row is `first_row`; a value that is not UTF-8
  is bad input."""
  try:
    texts = column.to_pylist()
  except UnicodeDecodeError:  # Parquet and Arrow do not check UTF-8: find the rows at fault
    texts = []
    for row, value in enumerate(column.cast(pa.binary()).to_pylist(), first_row):
      try:
        texts.append(None if value is None else value.decode("utf-8"))
      except UnicodeDecodeError as error:
        report.bad_input(f"{where} row {row}", error)
        texts.append(None)
  for row, text in enumerate(texts, first_row):
    yield f"{where} row {row}", text


def is_text_type(arrow_type: pa.DataType) -> bool:
  """Whether a column of `arrow_type` holds text (or only nulls)."""
  return any(check(arrow_type) for check in (pa.types.is_string, pa.types.is_large_string,
                                             pa.types.is_string_view, pa.types.is_null))
