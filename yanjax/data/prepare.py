"""Prepares a token store from a text corpus: tokenizer, train/validation token arrays, metadata.

The library call behind `python -m data_pipelines.prepare` (its command line) and the trainer's default
corpus: `prepare_store(PrepareSettings(output=..., ...))`. With no inputs it reads the running Python's
standard-library sources. Re-running with the same inputs (paths, sizes, mtimes) and settings is a no-op;
the store is published atomically (on object stores: metadata.json last). See docs/data.md.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
import random
import secrets
import sys
import time
from typing import Any, Iterable, Iterator, Sequence

import tqdm
from etils import epath

from yanjax.core import storage
from yanjax.data import sources, store_writer, tokenizer
from yanjax.data import store as store_format
from yanjax.data.errors import (
  CorpusError,
  DataError,
  StoreError,
  TokenizerMismatchError,
)

DEFAULT_VOCAB_SIZE = 2048
_BATCH_CHARS = 1 << 20  # characters handed to the tokenizer threads at once
# Settings that change the prepared data; they enter the fingerprint and the metadata.
_DATA_SETTINGS = ("vocab_size", "tokenizer_type", "tokenizer_sample_bytes", "text_field",
                  "validation_fraction", "seed", "on_bad_input")


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
  """What to prepare; the command line's flags of the same names (python -m data_pipelines.prepare --help)."""
  output: str  # directory of the store to publish: a local path, gs://bucket/path or s3://bucket/path
  inputs: Sequence[str] = ()  # files, directories, globs, .jsonl[.gz], .parquet; () = the Python stdlib
  vocab_size: int | None = None  # pieces of the trained tokenizer (None: DEFAULT_VOCAB_SIZE, or the given model's)
  tokenizer_type: str = "bpe"  # one of tokenizer.MODEL_TYPES
  tokenizer_model: str | None = None  # reuse this sentencepiece .model (local, gs:// or s3://)
  tokenizer_sample_bytes: int = 4_000_000  # text (files in seeded random order) the tokenizer trains on
  text_field: str = "text"  # JSONL field / Parquet column with the text
  validation_fraction: float = 0.01  # documents held out for validation
  seed: int = 0  # seed of the validation split and the tokenizer's sample
  on_bad_input: str = "skip"  # one of sources.BAD_INPUT_POLICIES
  overwrite: bool = False  # replace a store prepared from other inputs or settings
  num_threads: int = dataclasses.field(default_factory=lambda: len(os.sched_getaffinity(0)))  # tokenizer threads


def is_validation(seed: int, path: pathlib.Path, index: int, fraction: float) -> bool:
  """Whether document `index` of file `path` is held out: a seeded hash of both, below `fraction`."""
  digest = hashlib.blake2b(f"{seed}:{path}:{index}".encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0**64 < fraction


def fingerprint(files: Sequence[sources.SourceFile], settings: dict[str, Any]) -> str:
  """sha256 of the file list (paths, sizes, mtimes) and the data settings."""
  listing = [[str(f.path), f.size, f.mtime_ns] for f in files]
  payload = {"format_version": store_format.FORMAT_VERSION, "settings": settings, "files": listing}
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def prepare_store(args: PrepareSettings) -> epath.Path:
  """Prepares the store `args` describe, or does nothing when it is already up to date; raises DataError
  (or ConfigError for unreachable storage) naming the setting at fault."""
  _check_args(args)
  out = store_format.store_path(args.output)
  urls = [spec for spec in args.inputs if "://" in spec]
  if urls:
    raise CorpusError(f"input {urls[0]}: inputs are read from local files only (the output and "
                      "--tokenizer_model may be gs:// or s3:// URLs); copy the corpus to local disk")
  files = sources.list_files(args.inputs) if args.inputs else sources.stdlib_files()
  if not files:
    raise CorpusError("no input files: name text, JSONL or Parquet files, directories or globs")
  given_model = _given_tokenizer(args)
  vocab_size = (tokenizer.load(given_model).vocab_size() if given_model else
                args.vocab_size or DEFAULT_VOCAB_SIZE)
  settings = {**{k: getattr(args, k) for k in _DATA_SETTINGS}, "vocab_size": vocab_size,
              "tokenizer_model_sha256": given_model and hashlib.sha256(given_model).hexdigest()}
  data_fingerprint = fingerprint(files, settings)
  inside = [str(f.path) for f in files if _is_within(f.path, out)]
  if inside:
    raise StoreError(f"--output {out} contains the input {inside[0]}; choose an --output outside the inputs")
  if _up_to_date(out, data_fingerprint, args.overwrite):
    print(f"{out} is up to date (fingerprint {data_fingerprint[:12]}); nothing to do")
    return out
  _check_writable(out)
  for leftover in sorted(out.parent.glob(f"{out.name}{store_format.TEMP_MARKER}*")):
    print(f"warning: {leftover} is left from an interrupted preparation and is never read; delete it",
          file=sys.stderr)

  start = time.time()
  model = given_model or _train_tokenizer(args, files, vocab_size)
  processor = tokenizer.load(model)
  report = sources.ReadReport(args.on_bad_input)
  with store_writer.StoreBuilder(out, model) as builder:
    documents = sources.read_documents(files, args.text_field, report)
    _tokenize_into(builder, documents, processor, files, args)
    if report.documents == 0:
      raise CorpusError(f"the corpus ({len(files)} files) holds no text after skipping "
                        f"{report.skipped} bad inputs; check the inputs")
    if builder.splits["train"].num_documents == 0:
      raise CorpusError(f"all {report.documents} documents went to validation; lower "
                        "--validation_fraction")
    builder.publish(_metadata(args, files, settings, data_fingerprint, report),
                    overwrite=args.overwrite)
  _print_summary(out, report, time.time() - start)
  return out


def _check_args(args: PrepareSettings):
  if args.vocab_size is not None and args.vocab_size <= 0:
    raise DataError(f"--vocab_size={args.vocab_size} must be positive")
  if not 0 <= args.validation_fraction < 1:
    raise DataError(f"--validation_fraction={args.validation_fraction} must be in [0, 1)")
  if args.tokenizer_sample_bytes <= 0 or args.num_threads <= 0:
    raise DataError("--tokenizer_sample_bytes and --num_threads must be positive")


def _given_tokenizer(args: PrepareSettings) -> bytes | None:
  """The bytes of --tokenizer_model, checked against --vocab_size; None when none is given."""
  if not args.tokenizer_model:
    return None
  path = storage.as_path(args.tokenizer_model)
  fix = "check --tokenizer_model, the bucket and the credentials"
  if not storage.run_with_deadline(path.is_file, path, "--tokenizer_model", fix):
    raise DataError(f"--tokenizer_model {path} is not a file")
  model = storage.run_with_deadline(path.read_bytes, path, "--tokenizer_model", fix)
  vocab_size = tokenizer.load(model).vocab_size()
  if args.vocab_size not in (None, vocab_size):
    raise TokenizerMismatchError(
        f"--tokenizer_model {path} has {vocab_size} pieces but --vocab_size is {args.vocab_size}; "
        f"drop --vocab_size or pass --vocab_size={vocab_size}")
  return model


def _train_tokenizer(args: PrepareSettings, files: Sequence[sources.SourceFile],
                     vocab_size: int) -> bytes:
  """A tokenizer trained on the first --tokenizer_sample_bytes of the files in seeded random order."""
  order = random.Random(args.seed).sample(range(len(files)), len(files))
  report = sources.ReadReport(args.on_bad_input)
  texts = (d.text for d in sources.read_documents([files[i] for i in order], args.text_field, report))
  sentences = tokenizer.sample_sentences(texts, args.tokenizer_sample_bytes)
  if not sentences:
    raise CorpusError(f"the corpus ({len(files)} files) holds no text after skipping {report.skipped} "
                      "bad inputs; check the inputs")
  return tokenizer.train(sentences, vocab_size, args.tokenizer_type, args.num_threads)


def _is_within(path, directory: epath.Path) -> bool:
  """Whether local `path` is `directory` or inside it (False for a bucket `directory`)."""
  if storage.is_remote(directory):
    return False
  return os.path.commonpath([os.path.abspath(path), os.fspath(directory)]) == os.fspath(directory)


def _up_to_date(out: epath.Path, expected_fingerprint: str, overwrite: bool) -> bool:
  """True when `out` is a trusted store of this fingerprint; an error when it is another and may not go."""
  storage.forget_listings(out)
  if not storage.check_readable(out, "--output", "check the path, the bucket and the credentials"):
    return False
  try:
    existing = store_format.open_store(out).metadata["fingerprint"]
  except DataError as e:
    existing, why = None, f"is not a trusted store ({e})"
  else:
    why = "was prepared from other inputs or settings"
  if existing == expected_fingerprint:
    return True
  foreign = store_writer.foreign_entries(out)
  if foreign:  # never replace what yanjax did not write, --overwrite or not
    raise StoreError(f"{out} holds files that are not part of a token store ({', '.join(foreign[:5])}"
                     f"{' ...' if len(foreign) > 5 else ''}); it is never replaced: choose another --output")
  if not overwrite:
    raise StoreError(f"{out} {why}; pass --overwrite to replace it, or choose another --output")
  return False


def _check_writable(out: epath.Path):
  """ConfigError naming `out` unless a probe object can be written next to it (a missing bucket,
  rejected credentials or an unreachable endpoint fail here, before the tokenizer is trained)."""
  if not storage.is_remote(out):
    storage.check_writable(out.parent, "--output", "choose a writable --output")
    return
  probe = out.parent / f".yanjax-write-probe-{secrets.token_hex(4)}"

  def write_and_delete():  # no mkdir: on object stores it would create a missing bucket
    probe.write_text("probe")
    probe.unlink()

  storage.run_with_deadline(write_and_delete, out, "--output",
                            "check the bucket name, the credentials and (for s3://) AWS_ENDPOINT_URL")


def _batches(documents: Iterable[sources.Document], max_chars: int) -> Iterator[list[sources.Document]]:
  batch, size = [], 0
  for document in documents:
    batch.append(document)
    size += len(document.text)
    if size >= max_chars:
      yield batch
      batch, size = [], 0
  if batch:
    yield batch


def _tokenize_into(builder: store_writer.StoreBuilder, documents: Iterable[sources.Document],
                   processor, files: Sequence[sources.SourceFile], args: PrepareSettings):
  """Encodes batches on all threads while the next batch is read; routes documents to their split."""
  progress = tqdm.tqdm(total=len(files), unit="file", desc="tokenizing", file=sys.stderr)
  in_flight = collections.deque()
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor, progress:

    def write_oldest():
      future, batch = in_flight.popleft()
      routed = {name: [] for name in builder.splits}
      for document, ids in zip(batch, future.result()):
        held_out = is_validation(args.seed, files[document.source].path, document.index,
                                 args.validation_fraction)
        routed["validation" if held_out else "train"].append(ids)
      for name, ids in routed.items():
        builder.splits[name].add(ids)
      progress.update(batch[-1].source - progress.n)
      progress.set_postfix(tokens=sum(s.num_tokens for s in builder.splits.values()), refresh=False)

    for batch in _batches(documents, _BATCH_CHARS):
      texts = [d.text for d in batch]
      in_flight.append((executor.submit(tokenizer.encode, processor, texts, args.num_threads), batch))
      if len(in_flight) > 1:
        write_oldest()
    while in_flight:
      write_oldest()
    progress.update(len(files) - progress.n)


def _metadata(args, files, settings, data_fingerprint, report) -> dict[str, Any]:
  return {
      "fingerprint": data_fingerprint,
      "settings": settings,
      "tokenizer": {"origin": args.tokenizer_model or f"trained ({args.tokenizer_type})"},
      "document_format": "bos_id, tokens of the text, eos_id",
      "sources": {
          "inputs": list(args.inputs) or [f"python stdlib: {sources.stdlib_root()}"],
          "num_files": len(files),
          "num_bytes": sum(max(f.size, 0) for f in files),
          "num_documents": report.documents,
          "empty_documents": report.empty_documents,
          "skipped_inputs": report.skipped,
          "skipped_examples": report.skipped_examples,
      },
  }


def _print_summary(out: epath.Path, report: sources.ReadReport, seconds: float):
  metadata = store_format.open_store(out).metadata
  splits = ", ".join(f"{name}: {s['num_documents']} documents, {s['num_tokens']} tokens"
                     for name, s in metadata["splits"].items())
  print(f"prepared {out} in {seconds:.1f}s ({splits}); vocabulary {metadata['tokenizer']['vocab_size']}")
  if metadata["splits"]["validation"]["num_documents"] == 0:
    print("warning: the validation split is empty; raise --validation_fraction to hold documents out",
          file=sys.stderr)
  if report.skipped:
    print(f"skipped {report.skipped} bad inputs (listed in metadata.json), e.g. "
          f"{report.skipped_examples[0]}", file=sys.stderr)
