"""Reading corpora into documents, streamed: text, JSONL(.gz) and Parquet files (local, gs:// or s3://),
Hugging Face datasets (hf_datasets.py), or the Python standard library.

A plain-text file splits into documents by `sample_by`: the whole file, paragraphs (runs of lines between
blank lines) or lines. A JSONL line or a Parquet row is one document, its text in the configured field
(column). Unreadable files, non-UTF-8 text, malformed JSONL lines and Parquet files, and documents larger
than MAX_DOCUMENT_BYTES are "bad input": skipped and counted (policy "skip") or a `CorpusError` (policy
"fail"). A record or file without the text field, and an input that matches nothing, are always errors.
Empty documents (no text, or only whitespace) are counted, not yielded.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import json
import os
import pathlib
import sysconfig
import zlib
from typing import BinaryIO, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath

from yanjax.core import storage
from yanjax.data.documents import Document, ReadReport, column_texts, counted, is_text_type
from yanjax.data.errors import CorpusError
from yanjax.data.hf_datasets import DatasetRows, read_rows

BAD_INPUT_POLICIES = ("skip", "fail")
SAMPLE_BY = ("document", "paragraph", "line")  # how a plain-text file splits into documents (as `datasets`' text)
MAX_DOCUMENT_BYTES = 64 << 20  # the most one document (a whole file, a paragraph, a line) may hold
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
_PARQUET_BATCH_ROWS = 1024
_LISTING_FIX = "check the path, the bucket and the credentials"
# Errors of the bytes themselves (as opposed to the storage holding them): the input is bad.
_CONTENT_ERRORS = (UnicodeDecodeError, EOFError, zlib.error, gzip.BadGzipFile, pa.ArrowException)


@dataclasses.dataclass(frozen=True)
class InputFile:
  """An input file and what fingerprints it."""

  url: str  # absolute local path, or gs:// / s3:// URL
  size: int  # bytes; -1 when it cannot be stat'ed
  version: str  # changes when the file does: local st_mtime_ns; buckets: generation, ETag or mtime

  @property
  def kind(self) -> str:
    """"jsonl" (.jsonl, .jsonl.gz), "parquet" or "text", from the name."""
    if self.url.endswith((".jsonl", ".jsonl.gz")):
      return "jsonl"
    return "parquet" if self.url.endswith(".parquet") else "text"


def stdlib_root() -> pathlib.Path:
  """The running Python's standard-library directory."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[InputFile]:
  """The standard library's `.py` files, without tests and installed packages (STDLIB_EXCLUDED_DIRS)."""
  root = stdlib_root()
  paths = sorted(p for p in root.rglob("*.py")
                 if not STDLIB_EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]))
  return [_local_file(p) for p in paths]


def list_inputs(specs: Sequence[str]) -> list[InputFile]:
  """Files named by `specs` (files, directories and prefixes walked recursively, globs; local, gs:// or s3://),
  in order, without repeats. Hidden entries (names starting with ".") inside directories are left out.

  Raises CorpusError for a spec that matches nothing, and ConfigError (one line) when a bucket cannot be
  reached or read.
  """
  files: dict[str, InputFile] = {}
  for spec in specs:
    storage.check_url(spec)
    found = _list_remote(spec) if storage.is_remote(spec) else _list_local(spec)
    if not found:
      raise CorpusError(f"input {spec!r} matches no file; check the path or glob")
    files.update((f.url, f) for f in found)
  return list(files.values())


def _list_local(spec: str) -> list[InputFile]:
  if _is_glob(spec):
    matches = [pathlib.Path(m) for m in sorted(glob.glob(spec, recursive=True))]
  else:
    matches = [pathlib.Path(spec)] if os.path.lexists(spec) else []
  paths = [f for match in matches for f in (_walk(match) if match.is_dir() else [match])]
  return [_local_file(p.absolute()) for p in paths]


def _walk(directory: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in directory.rglob("*")
                if p.is_file() and not _is_hidden(p.relative_to(directory).as_posix()))


def _local_file(path: pathlib.Path) -> InputFile:
  try:
    stat = path.stat()
  except OSError:  # a broken link: listed, and bad input when read
    return InputFile(str(path), -1, "-1")
  return InputFile(str(path), stat.st_size, str(stat.st_mtime_ns))


def _list_remote(spec: str) -> list[InputFile]:
  """Objects under a bucket URL (an object, a prefix or a glob), sorted within the spec."""
  scheme, key = spec.split("://", 1)
  storage.forget_listings(spec)
  fs = epath.backend.fsspec_backend.fs(spec)
  glob_at = min((key.index(c) for c in "*?[" if c in key), default=None)
  base = key.rstrip("/") if glob_at is None else key[:glob_at].rpartition("/")[0]
  info = _probe(fs, spec, base)

  def under(prefix: str) -> dict[str, dict]:
    found = fs.find(prefix + "/", detail=True)
    return {name: found[name] for name in found if not _is_hidden(name[len(prefix):])}

  objects: dict[str, dict] = {}
  try:
    if glob_at is not None:
      found = fs.glob(key, detail=True)
      matches = {name: found[name] for name in found if not _is_hidden(name[len(base):])}
    elif "/" not in base:  # a whole bucket
      matches = {base: {"type": "directory"}}
    else:
      matches = {base: info} if info else {}
    for name, match in sorted(matches.items()):
      objects.update(under(name) if match["type"] == "directory" else {name: match})
  except OSError as error:
    raise CorpusError(f"input {spec}: {storage.describe_storage_error(error, spec)}; {_LISTING_FIX}") from error
  return [InputFile(f"{scheme}://{name}", int(info["size"]), _object_version(info))
          for name, info in sorted(objects.items())]


def _probe(fs, spec: str, name: str) -> dict | None:
  """fsspec's info on `name` (None when no object or prefix has it), with a deadline; ConfigError (one line)
  when the bucket is missing, unreachable or unreadable."""
  def probe():
    try:
      return fs.info(name if "/" in name else f"{name}/.yanjax-probe")  # an object's name: a missing bucket says so
    except FileNotFoundError as error:
      if storage.describe_storage_error(error, spec).startswith("the bucket "):
        raise
      return None

  return storage.run_with_deadline(probe, spec, "input", _LISTING_FIX)


def _object_version(info: dict) -> str:
  """What changes when an object does: GCS's generation, S3's ETag, or the modification time."""
  for field in ("generation", "ETag", "etag", "mtime", "LastModified", "updated"):
    if info.get(field) is not None:
      return str(info[field])
  return ""


def _is_glob(spec: str) -> bool:
  return any(c in spec for c in "*?[")


def _is_hidden(relative: str) -> bool:
  return any(part.startswith(".") for part in relative.split("/"))


def read_documents(part: InputFile | DatasetRows, text_field: str, sample_by: str,
                   report: ReadReport) -> Iterator[Document]:
  """The documents of one file or row range, in order, streamed; counted in `report`.

  Memory stays bounded by one document (at most MAX_DOCUMENT_BYTES) and a read buffer, whatever the file's
  size. Raises CorpusError for a missing text field, and for a bucket that fails while it is read.
  """
  if isinstance(part, DatasetRows):
    yield from read_rows(part, text_field, report)
    return
  if sample_by not in SAMPLE_BY:
    raise ValueError(f"sample_by={sample_by!r} is not one of {SAMPLE_BY}")
  readers = {"text": _text_documents, "jsonl": _jsonl_texts, "parquet": _parquet_texts}
  try:
    with storage.as_path(part.url).open("rb") as raw:
      yield from counted(readers[part.kind](raw, part.url, text_field, sample_by, report), report)
  except _CONTENT_ERRORS as error:
    report.bad_input(part.url, error)
  except OSError as error:
    if not storage.is_remote(part.url):  # unreadable local files are bad input, as a corrupt one is
      report.bad_input(part.url, error)
      return
    raise CorpusError(f"cannot read {part.url}: {storage.describe_storage_error(error, part.url)}; "
                      "check the bucket, the credentials and the network, then run again") from error


def _text_documents(raw: BinaryIO, url: str, text_field: str, sample_by: str,
                    report: ReadReport) -> Iterator[tuple[str, str | None]]:
  del text_field  # plain text has no fields
  f = _decompressed(raw, url)
  if sample_by == "document":
    data = f.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
      report.bad_input(url, ValueError(f"larger than {MAX_DOCUMENT_BYTES} bytes, the most one document may "
                                       "hold; pass --text_sample_by=paragraph or line"))
      return
    yield url, data.decode("utf-8")  # non-UTF-8: the whole file is bad input
  elif sample_by == "line":
    for number, line in _lines(f, url, report):
      text = None if line is None else _decoded(line, f"{url}:{number}", report)
      if text is not None:
        yield f"{url}:{number}", text
  else:
    yield from _paragraphs(f, url, report)


def _paragraphs(f: BinaryIO, url: str, report: ReadReport) -> Iterator[tuple[str, str]]:
  """Runs of lines between blank (or whitespace-only) lines. A paragraph with a bad line, or larger than
  MAX_DOCUMENT_BYTES, is bad input (named by the line at fault, or by its first line) and left out whole."""
  lines: list[str] | None = []  # the paragraph so far; None while skipping a bad one up to the next blank line
  first = size = 0
  for number, line in _lines(f, url, report):
    if line is not None and not line.strip():
      if lines:
        yield f"{url}:{first}", "\n".join(lines)
      lines, size = [], 0
      continue
    if lines is None:
      continue
    if not lines:
      first = number
    text = None if line is None else _decoded(line, f"{url}:{number}", report)
    size += len(line or b"")
    if text is not None and size > MAX_DOCUMENT_BYTES:
      report.bad_input(f"{url}:{first}", ValueError(f"a paragraph larger than {MAX_DOCUMENT_BYTES} bytes, the "
                                                    "most one document may hold; pass --text_sample_by=line"))
      text = None
    if text is None:
      lines = None
    else:
      lines.append(text)
  if lines:
    yield f"{url}:{first}", "\n".join(lines)


def _jsonl_texts(raw: BinaryIO, url: str, text_field: str, sample_by: str,
                 report: ReadReport) -> Iterator[tuple[str, str | None]]:
  del sample_by  # one document a line
  for number, line in _lines(_decompressed(raw, url), url, report):
    if line is None or not line.strip():
      continue
    where = f"{url}:{number}"
    try:
      record = json.loads(line)
    except ValueError as error:  # invalid JSON or invalid UTF-8
      report.bad_input(where, error)
      continue
    if not isinstance(record, dict) or text_field not in record:
      keys = sorted(record)[:10] if isinstance(record, dict) else type(record).__name__
      raise CorpusError(f"{where}: record has no field {text_field!r} (it has {keys}); "
                        "pass --text_field=<the field holding the text>")
    text = record[text_field]
    if not isinstance(text, (str, type(None))):
      raise CorpusError(f"{where}: field {text_field!r} holds a {type(text).__name__}, not text; "
                        "pass --text_field=<a text field>")
    yield where, text


def _parquet_texts(raw: BinaryIO, url: str, text_field: str, sample_by: str,
                   report: ReadReport) -> Iterator[tuple[str, str | None]]:
  del sample_by  # one document a row
  parquet = pq.ParquetFile(raw)
  schema = parquet.schema_arrow
  if text_field not in schema.names:
    raise CorpusError(f"{url}: no column {text_field!r} (it has {schema.names[:10]}); "
                      "pass --text_field=<the column holding the text>")
  column_type = schema.field(text_field).type
  if not is_text_type(column_type):
    raise CorpusError(f"{url}: column {text_field!r} has type {column_type}, not text; "
                      "pass --text_field=<a text column>")
  row = 0
  for batch in parquet.iter_batches(columns=[text_field], batch_size=_PARQUET_BATCH_ROWS):
    yield from column_texts(batch.column(0), row, url, report)
    row += batch.num_rows


def _decompressed(raw: BinaryIO, url: str) -> BinaryIO:
  """The file's bytes, gunzipped when its name ends in .gz, behind a buffer whose readline takes a limit."""
  if url.endswith(".gz"):
    return gzip.GzipFile(fileobj=raw)
  return raw if isinstance(raw, io.BufferedIOBase) else io.BufferedReader(raw, 1 << 20)


def _lines(f: BinaryIO, url: str, report: ReadReport) -> Iterator[tuple[int, bytes | None]]:
  """(number from 1, line without "\\n" or "\\r\\n"); None for a line larger than MAX_DOCUMENT_BYTES, which
  is bad input and never held whole."""
  number = 0
  while line := f.readline(MAX_DOCUMENT_BYTES + 1):  # + 1: room for the "\n" of a line of the largest size
    number += 1
    if len(line) > MAX_DOCUMENT_BYTES and not line.endswith(b"\n"):
      while not line.endswith(b"\n") and (line := f.readline(MAX_DOCUMENT_BYTES)):
        pass
      report.bad_input(f"{url}:{number}", ValueError(f"a line larger than {MAX_DOCUMENT_BYTES} bytes, the most "
                                                     "one document may hold"))
      yield number, None
    else:
      yield number, line.removesuffix(b"\n").removesuffix(b"\r")


def _decoded(line: bytes, where: str, report: ReadReport) -> str | None:
  """`line` as text; None when it is not UTF-8 (bad input)."""
  try:
    return line.decode("utf-8")
  except UnicodeDecodeError as error:
    report.bad_input(where, error)
    return None
