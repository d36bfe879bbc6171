"""Prepares a token store from a corpus on Ray Data: tokenizer, train/validation shards, metadata.

The library call behind `python -m data_pipelines.prepare` (its command line) and the trainer's default
corpus: `prepare_store(PrepareSettings(output=..., ...))`. The same code runs on a laptop (Ray started in this
process) and on a Ray cluster (`ray_address`). The corpus is cut into input shards (yanjax.data.units);
Ray tasks draw the tokenizer's sample from all of them, hash their documents for dedup, and tokenize each
into its own shard of every split (yanjax.data.prepare_tasks). The store is built in
`<output>.tmp-<fingerprint>` and published atomically once every shard is written (metadata.json last); a
re-run after an interruption keeps the shards whose checksums verify. Re-running a finished preparation
with the same inputs and settings is a no-op. See docs/data.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import sys
import time
from typing import Any, Sequence

import numpy as np
from etils import epath

from yanjax.core import storage
from yanjax.data import content, hf_datasets, prepare_tasks, ray_runner, sources, store_writer, units
from yanjax.data import store as store_format
from yanjax.data import tokenizer as tokenizers
from yanjax.data.errors import (
  CorpusError,
  DataError,
  DiskFullError,
  StoreError,
  TokenizerMismatchError,
  WorkerKilledError,
)

DEFAULT_VOCAB_SIZE = 2048
TOKEN_DTYPES = ("auto", "uint16", "uint32")
# Settings that change the prepared data; they enter the fingerprint and the metadata.
_DATA_SETTINGS = ("vocab_size", "tokenizer_type", "tokenizer_sample_bytes", "text_field", "text_sample_by",
                  "hf_config", "hf_split", "validation_fraction", "seed", "dedup", "on_bad_input", "token_dtype",
                  "input_shard_bytes")


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
  """What to prepare; the command line's flags of the same names (python -m data_pipelines.prepare --help)."""
  output: str  # directory of the store to publish: a local path, gs://bucket/path or s3://bucket/path
  inputs: Sequence[str] = ()  # files, directories, globs, local or gs:// / s3://; () and no hf_datasets: the stdlib
  hf_datasets: Sequence[str] = ()  # Hugging Face datasets: save_to_disk directories, .parquet/.arrow globs, hub names
  hf_config: str | None = None  # the hub datasets' configuration
  hf_split: str = "train"  # the split of every Hugging Face dataset
  vocab_size: int | None = None  # pieces of the trained tokenizer (None: DEFAULT_VOCAB_SIZE, or the given one's)
  tokenizer_type: str = "bpe"  # one of tokenizers.MODEL_TYPES (a trained sentencepiece model)
  tokenizer_model: str | None = None  # use this sentencepiece .model or tokenizer.json (local, gs:// or s3://)
  tokenizer_sample_bytes: int = 4_000_000  # text, drawn from every input shard, the tokenizer trains on
  text_field: str = "text"  # JSONL field / Parquet or dataset column with the text
  text_sample_by: str = "document"  # one of sources.SAMPLE_BY: what a document of a plain-text file is
  validation_fraction: float = 0.01  # documents held out for validation, chosen by content hash
  seed: int = 0  # seed of the validation split
  dedup: bool = False  # drop documents whose exact text occurred earlier in the corpus
  on_bad_input: str = "skip"  # one of sources.BAD_INPUT_POLICIES
  token_dtype: str = "auto"  # one of TOKEN_DTYPES: the stored ids' type (auto: uint16 when the vocabulary fits)
  input_shard_bytes: int | None = None  # input bytes one task reads (None: units.target_bytes of the corpus)
  overwrite: bool = False  # replace a store prepared from other inputs or settings
  ray_address: str | None = None  # the Ray cluster to run on (None: $RAY_ADDRESS, else Ray on this machine)
  num_workers: int | None = None  # tasks at once (None: every CPU of the cluster, or of this machine)
  max_unit_tries: int = 3  # tries of a unit whose Ray worker dies (killed for memory, crashed) before the run fails
  progress: bool = True  # Ray Data's progress bars on stderr


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The inputs a preparation reads, cut into units."""
  files: list[sources.InputFile]
  datasets: list[units.DatasetSize]
  dataset_versions: list[str]
  units: list[units.Unit]

  def listing(self) -> dict[str, Any]:
    """What identifies the inputs in the fingerprint: every file's URL, size and version; every dataset's."""
    return {"files": [[f.url, f.size, f.version] for f in self.files],
            "datasets": [[d.dataset, d.config, d.split, d.num_rows, v]
                         for d, v in zip(self.datasets, self.dataset_versions)]}


def fingerprint(corpus: Corpus, settings: dict[str, Any]) -> str:
  """sha256 of the inputs (`Corpus.listing`) and the data settings."""
  payload = {"format_version": store_format.FORMAT_VERSION, "settings": settings, "inputs": corpus.listing()}
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def prepare_store(args: PrepareSettings) -> epath.Path:
  """Prepares the store `args` describe, or does nothing when it is already up to date; raises DataError
  (or ConfigError for unreachable storage) naming the setting at fault."""
  _check_args(args)
  out = store_format.store_path(args.output)
  corpus = _corpus(args)
  given = _given_tokenizer(args)
  vocab_size = given.vocab_size if given else args.vocab_size or DEFAULT_VOCAB_SIZE
  dtype = _token_dtype(args.token_dtype, vocab_size)
  settings = {**{k: getattr(args, k) for k in _DATA_SETTINGS}, "vocab_size": vocab_size,
              "tokenizer_model_sha256": given and given.sha256}
  data_fingerprint = fingerprint(corpus, settings)
  inside = [f.url for f in corpus.files if _is_within(f.url, out)]
  if inside:
    raise StoreError(f"--output {out} contains the input {inside[0]}; choose an --output outside the inputs")
  if _up_to_date(out, data_fingerprint, args.overwrite):
    print(f"{out} is up to date (fingerprint {data_fingerprint[:12]}); nothing to do")
    return out
  if storage.is_bucket_root(out):
    raise StoreError(f"{out} is a bucket; a store needs a path inside it, such as {out}/stores/name")
  _check_writable(out)
  temp_dir = store_writer.temporary_directory(out, data_fingerprint)
  _warn_about_leftovers(out, temp_dir)
  start = time.time()
  read = prepare_tasks.ReadSettings(args.text_field, args.text_sample_by, args.on_bad_input)
  try:
    with ray_runner.connect(args.ray_address, args.num_workers):
      tokenizer = _tokenizer(args, corpus, read, temp_dir, given, vocab_size)
      repeated = _repeated_copies(args, corpus, read)
      task = prepare_tasks.TokenizeTask(read, os.fspath(temp_dir), data_fingerprint, tokenizer.data, dtype.name,
                                        args.seed, args.validation_fraction)
      items = [prepare_tasks.item(u, repeated=repeated[u.index].astype(np.int64).tobytes()) for u in corpus.units]
      records = sorted(ray_runner.run(task, items, args.num_workers, args.progress, args.max_unit_tries),
                       key=lambda r: r["unit"])
    metadata = _metadata(args, corpus, settings, data_fingerprint, tokenizer, dtype, records)
    _check_splits(metadata, corpus)
    store_writer.publish(temp_dir, out, metadata, overwrite=args.overwrite)
  except (CorpusError, TokenizerMismatchError):  # the inputs must change, and so the fingerprint: nothing to resume
    storage.remove_tree(temp_dir, missing_ok=True)
    raise
  except WorkerKilledError as e:
    raise _killed_unit(corpus.units[e.index], e.tries, temp_dir) from e
  except DiskFullError as e:
    raise DataError(f"no space left on device under {temp_dir} ({e}); the units already prepared are kept "
                    "there: free space or choose an --output on another disk, then re-run the same command to "
                    "resume") from e
  _print_summary(out, metadata, time.time() - start)
  return out


def _check_args(args: PrepareSettings):
  if args.vocab_size is not None and args.vocab_size <= 0:
    raise DataError(f"--vocab_size={args.vocab_size} must be positive")
  if not 0 <= args.validation_fraction < 1:
    raise DataError(f"--validation_fraction={args.validation_fraction} must be in [0, 1)")
  if args.tokenizer_sample_bytes <= 0:
    raise DataError(f"--tokenizer_sample_bytes={args.tokenizer_sample_bytes} must be positive")
  for name in ("num_workers", "input_shard_bytes", "max_unit_tries"):
    if getattr(args, name) is not None and getattr(args, name) <= 0:
      raise DataError(f"--{name}={getattr(args, name)} must be positive")
  choices = {"text_sample_by": sources.SAMPLE_BY, "on_bad_input": sources.BAD_INPUT_POLICIES,
             "token_dtype": TOKEN_DTYPES, "tokenizer_type": tokenizers.MODEL_TYPES}
  for name, allowed in choices.items():
    if getattr(args, name) not in allowed:
      raise DataError(f"--{name}={getattr(args, name)!r} must be one of {', '.join(allowed)}")


def _killed_unit(unit: units.Unit, tries: int, temp_dir: epath.Path) -> DataError:
  """The error of a unit whose Ray worker died in every try: which inputs, and what a re-run keeps."""
  return DataError(
      f"input shard {unit.name} ({', '.join(unit.describe())}) killed its Ray worker {tries} times "
      f"(--max_unit_tries={tries}; killed for memory, or crashed); the units already prepared are kept in "
      f"{temp_dir}: re-run the same command (with fewer --num_workers, if it ran out of memory) to resume from "
      "them, or fix or remove that input (the preparation then starts over, its inputs changed)")


def _corpus(args: PrepareSettings) -> Corpus:
  """The input files and datasets, measured and cut into units."""
  default = not args.inputs and not args.hf_datasets
  files = sources.stdlib_files() if default else sources.list_inputs(args.inputs) if args.inputs else []
  sizes, versions = [], []
  for dataset in args.hf_datasets:
    num_rows, num_bytes, version = hf_datasets.describe(dataset, args.hf_config, args.hf_split)
    sizes.append(units.DatasetSize(dataset, args.hf_config, args.hf_split, num_rows, num_bytes))
    versions.append(version)
  corpus = Corpus(files, sizes, versions, units.plan(files, sizes, args.input_shard_bytes))
  if not corpus.units:
    raise CorpusError("no input files or rows: name text, JSONL or Parquet files, directories or globs, or "
                      "--hf_dataset")
  return corpus


def _given_tokenizer(args: PrepareSettings) -> tokenizers.Tokenizer | None:
  """The tokenizer --tokenizer_model names, checked against --vocab_size; None when none is given."""
  if not args.tokenizer_model:
    return None
  path = storage.as_path(args.tokenizer_model)
  fix = "check --tokenizer_model, the bucket and the credentials"
  if not storage.run_with_deadline(path.is_file, path, "--tokenizer_model", fix):
    raise DataError(f"--tokenizer_model {path} is not a file")
  tokenizer = tokenizers.from_bytes(storage.run_with_deadline(path.read_bytes, path, "--tokenizer_model", fix),
                                    f"--tokenizer_model {path}")
  if args.vocab_size not in (None, tokenizer.vocab_size):
    raise TokenizerMismatchError(
        f"--tokenizer_model {path} has {tokenizer.vocab_size} ids but --vocab_size is {args.vocab_size}; "
        f"drop --vocab_size or pass --vocab_size={tokenizer.vocab_size}")
  return tokenizer


def _token_dtype(name: str, vocab_size: int) -> np.dtype:
  """The dtype --token_dtype asks for; DataError when the vocabulary does not fit it."""
  dtype = store_format.token_dtype(vocab_size) if name == "auto" else np.dtype(name)
  if vocab_size - 1 > np.iinfo(dtype).max:
    raise DataError(f"--token_dtype={name}: a vocabulary of {vocab_size} ids does not fit {dtype.name} (at most "
                    f"{np.iinfo(dtype).max + 1}); pass --token_dtype=uint32 or auto")
  return dtype


def _warn_about_leftovers(out: epath.Path, temp_dir: epath.Path):
  """Says what earlier, interrupted preparations of other inputs or settings left beside `out`."""
  storage.forget_listings(out.parent)
  for leftover in sorted(out.parent.glob(f"{out.name}{store_format.TEMP_MARKER}*")):
    if leftover.name == temp_dir.name:
      print(f"resuming the interrupted preparation in {leftover}: its verified shards are kept", file=sys.stderr)
    else:
      print(f"warning: {leftover} is left from an interrupted preparation of other inputs or settings and is "
            "never read; delete it", file=sys.stderr)


def _tokenizer(args: PrepareSettings, corpus: Corpus, read: prepare_tasks.ReadSettings, temp_dir: epath.Path,
               given: tokenizers.Tokenizer | None, vocab_size: int) -> tokenizers.Tokenizer:
  """The store's tokenizer, written into `temp_dir`: the given one, the one an interrupted run of this
  preparation trained (its shards were tokenized with it), or one trained on a sample of every unit."""
  resumed = tokenizers.find_file(temp_dir)
  if given is None and resumed is not None:
    return tokenizers.read(resumed)
  if given is None:
    task = prepare_tasks.SampleTask(read, args.tokenizer_sample_bytes, sum(u.num_bytes for u in corpus.units))
    samples = dict(ray_runner.run(task, [prepare_tasks.item(u) for u in corpus.units], args.num_workers,
                                  args.progress, args.max_unit_tries))
    sentences = [s for index in sorted(samples) for s in samples[index]]
    if not sentences:
      raise CorpusError(f"the corpus ({len(corpus.units)} input shards) holds no text; check the inputs "
                        "(bad inputs are skipped under --on_bad_input=skip)")
    model = tokenizers.train_sentencepiece(sentences, vocab_size, args.tokenizer_type, len(os.sched_getaffinity(0)))
    given = tokenizers.from_bytes(model, "the trained tokenizer")
  if not storage.is_remote(temp_dir):
    (temp_dir / store_format.UNITS_DIR).mkdir(parents=True, exist_ok=True)
  storage.write_atomic(temp_dir / given.file_name, given.data)
  return given


def _repeated_copies(args: PrepareSettings, corpus: Corpus, read: prepare_tasks.ReadSettings) -> list[np.ndarray]:
  """Per unit, the indices of the documents exact dedup removes (none without --dedup)."""
  if not args.dedup:
    return [np.zeros(0, np.int64)] * len(corpus.units)
  task = prepare_tasks.DigestTask(read)
  digests = dict(ray_runner.run(task, [prepare_tasks.item(u) for u in corpus.units], args.num_workers,
                                args.progress, args.max_unit_tries))
  return content.repeated_copies([digests[u.index] for u in corpus.units])


def _metadata(args, corpus: Corpus, settings, data_fingerprint, tokenizer: tokenizers.Tokenizer, dtype: np.dtype,
              records: list[dict[str, Any]]) -> dict[str, Any]:
  """metadata.json: the manifest of every shard, what was read and skipped, how it was prepared."""
  report = sources.ReadReport(args.on_bad_input)
  for record in records:
    report.merge(sources.ReadReport(**record["report"]))
  splits = {}
  for split in store_format.SPLITS:
    shards = [r["splits"][split] for r in records if r["splits"][split]["num_documents"]]
    splits[split] = {"num_tokens": sum(s["num_tokens"] for s in shards),
                     "num_documents": sum(s["num_documents"] for s in shards), "shards": shards}
  default = not args.inputs and not args.hf_datasets
  return {
      "format": store_format.FORMAT_NAME,
      "format_version": store_format.FORMAT_VERSION,
      "fingerprint": data_fingerprint,
      "settings": settings,
      "tokenizer": {**tokenizer.metadata(), "origin": args.tokenizer_model or f"trained ({args.tokenizer_type})"},
      "token_dtype": dtype.name,
      "splits": splits,
      "document_format": "bos_id, tokens of the text, eos_id",
      "sources": {
          "inputs": [f"python stdlib: {sources.stdlib_root()}"] if default else list(args.inputs),
          "hf_datasets": list(args.hf_datasets),
          "num_files": len(corpus.files),
          "num_bytes": sum(u.num_bytes for u in corpus.units),
          "num_units": len(corpus.units),
          "num_documents": report.documents,
          "empty_documents": report.empty_documents,
          "duplicates_removed": sum(r["duplicates_removed"] for r in records),
          "skipped_inputs": report.skipped,
          "skipped_examples": report.skipped_examples,
      },
      "preparation": {
          "units_resumed": sum(r["resumed"] for r in records),
          "peak_rss_bytes_per_worker": max(r["peak_rss_bytes"] for r in records),
      },
  }


def _check_splits(metadata: dict[str, Any], corpus: Corpus):
  sources_meta, splits = metadata["sources"], metadata["splits"]
  if sources_meta["num_documents"] == 0:
    raise CorpusError(f"the corpus ({len(corpus.units)} input shards) holds no text after skipping "
                      f"{sources_meta['skipped_inputs']} bad inputs; check the inputs")
  if splits["train"]["num_documents"] == 0:
    raise CorpusError(f"all {splits['validation']['num_documents']} documents went to validation; lower "
                      "--validation_fraction")


def _is_within(path, directory: epath.Path) -> bool:
  """Whether `path` is `directory` or inside it (False when either is in a bucket)."""
  if storage.is_remote(directory) or storage.is_remote(path):
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


def _print_summary(out: epath.Path, metadata: dict[str, Any], seconds: float):
  splits = ", ".join(f"{name}: {s['num_documents']} documents, {s['num_tokens']} tokens"
                     for name, s in metadata["splits"].items())
  tokens = sum(s["num_tokens"] for s in metadata["splits"].values())
  found = metadata["sources"]
  print(f"prepared {out} in {seconds:.1f}s ({splits}; {tokens / max(seconds, 1e-9):,.0f} tokens/s); vocabulary "
        f"{metadata['tokenizer']['vocab_size']}; {found['num_units']} input shards "
        f"({metadata['preparation']['units_resumed']} kept from an interrupted run)")
  if found["duplicates_removed"]:
    print(f"removed {found['duplicates_removed']} exact duplicate documents", file=sys.stderr)
  if metadata["splits"]["validation"]["num_documents"] == 0:
    print("warning: the validation split is empty; raise --validation_fraction to hold documents out",
          file=sys.stderr)
  if found["skipped_inputs"]:
    print(f"skipped {found['skipped_inputs']} bad inputs (listed in metadata.json), e.g. "
          f"{found['skipped_examples'][0]}", file=sys.stderr)
