"""Reading corpora into documents: plain text, JSONL(.gz), Parquet, or the Python standard library.

A plain-text file is one document; a JSONL line or a Parquet row is one document, its text in the
configured field (column). Unreadable files, non-UTF-8 text and malformed JSONL lines are "bad input":
skipped and counted (policy "skip", the default) or a `CorpusError` (policy "fail"). A record without
the text field, an input path that matches nothing, and a corpus with no text are always errors.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import pathlib
import sysconfig
import zlib
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from yanjax.data.errors import CorpusError

BAD_INPUT_POLICIES = ("skip", "fail")
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
_MAX_EXAMPLES = 20  # skipped inputs named in the metadata; all are counted


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """An input file and the stat fields that fingerprint it (-1 when it cannot be stat'ed)."""

  path: pathlib.Path
  size: int
  mtime_ns: int

  @classmethod
  def from_path(cls, path: pathlib.Path) -> SourceFile:
    try:
      stat = path.stat()
    except OSError:
      return cls(path, -1, -1)
    return cls(path, stat.st_size, stat.st_mtime_ns)

  @property
  def kind(self) -> str:
    """"jsonl", "parquet" or "text", from the file name."""
    name = self.path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
      return "jsonl"
    return "parquet" if name.endswith(".parquet") else "text"


@dataclasses.dataclass(frozen=True)
class Document:
  """One document: its file's position in the file list, its number within that file, its text."""

  source: int
  index: int
  text: str


@dataclasses.dataclass
class ReadReport:
  """Counts what reading saw; applies the bad-input policy."""

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


def stdlib_root() -> pathlib.Path:
  """The running Python's standard-library directory."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[SourceFile]:
  """The standard library's `.py` files, without tests and installed packages (STDLIB_EXCLUDED_DIRS)."""
  root = stdlib_root()
  paths = sorted(p for p in root.rglob("*.py")
                 if not STDLIB_EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]))
  return [SourceFile.from_path(p) for p in paths]


def list_files(inputs: Sequence[str]) -> list[SourceFile]:
  """Files named by `inputs` (files, directories walked recursively, globs), in order, without repeats.

  Hidden entries (names starting with ".") inside directories are left out.
  """
  paths: dict[pathlib.Path, None] = {}
  for spec in inputs:
    if any(c in spec for c in "*?["):
      matches = [pathlib.Path(m) for m in sorted(glob.glob(spec, recursive=True))]
    else:
      matches = [pathlib.Path(spec)] if os.path.lexists(spec) else []
    found = [f for match in matches for f in (_walk(match) if match.is_dir() else [match])]
    if not found:
      raise CorpusError(f"input {spec!r} matches no file; check the path or glob")
    paths.update((f.absolute(), None) for f in found)
  return [SourceFile.from_path(p) for p in paths]


def _walk(directory: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in directory.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def read_documents(files: Sequence[SourceFile], text_field: str,
                   report: ReadReport) -> Iterator[Document]:
  """Documents of `files` in order; empty ones are counted in `report`, not yielded."""
  readers = {"text": _plain_texts, "jsonl": _jsonl_texts, "parquet": _parquet_texts}
  for source, file in enumerate(files):
    try:
      for index, text in enumerate(readers[file.kind](file.path, text_field, report)):
        if text:
          report.documents += 1
          yield Document(source, index, text)
        else:
          report.empty_documents += 1
    except (OSError, EOFError, UnicodeDecodeError, zlib.error, pa.ArrowException) as e:
      report.bad_input(str(file.path), e)


def _plain_texts(path: pathlib.Path, text_field: str, report: ReadReport) -> Iterator[str]:
  del text_field, report  # a plain-text file is one document, with nothing to skip inside it
  yield path.read_bytes().decode("utf-8")


def _jsonl_texts(path: pathlib.Path, text_field: str, report: ReadReport) -> Iterator[str]:
  opener = gzip.open if path.name.endswith(".gz") else open
  with opener(path, "rb") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:  # invalid JSON or invalid UTF-8
        report.bad_input(f"{path}:{line_number}", e)
        continue
      if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record)[:10] if isinstance(record, dict) else type(record).__name__
        raise CorpusError(f"{path}:{line_number}: record has no field {text_field!r} (it has {keys}); "
                          "pass --text_field=<the field holding the text>")
      text = record[text_field]
      if not isinstance(text, (str, type(None))):
        raise CorpusError(f"{path}:{line_number}: field {text_field!r} holds a "
                          f"{type(text).__name__}, not text; pass --text_field=<a text field>")
      yield text or ""


def _parquet_texts(path: pathlib.Path, text_field: str, report: ReadReport) -> Iterator[str]:
  del report  # Parquet rows are typed: a file is readable as a whole or not at all
  parquet = pq.ParquetFile(path)
  schema = parquet.schema_arrow
  if text_field not in schema.names:
    raise CorpusError(f"{path}: no column {text_field!r} (it has {schema.names[:10]}); "
                      "pass --text_field=<the column holding the text>")
  column_type = schema.field(text_field).type
  if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
    raise CorpusError(f"{path}: column {text_field!r} has type {column_type}, not text; "
                      "pass --text_field=<a text column>")
  for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
    for text in batch.column(0).to_pylist():
      yield text or ""
