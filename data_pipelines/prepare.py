"""Prepares a token store from a corpus on Ray Data: tokenizer, train/validation token shards, metadata.

  python -m data_pipelines.prepare --output data/stdlib --vocab_size 2048            # Python stdlib
  python -m data_pipelines.prepare --output data/web --vocab_size 32000 'gs://bucket/crawl/*.jsonl.gz'
  python -m data_pipelines.prepare --output s3://bucket/stores/web --hf_dataset data/saved_dataset \
      --tokenizer_model tokenizer.json --dedup --ray_address auto          # on a running Ray cluster

With no inputs it reads the running Python's standard-library sources. Ray runs on this machine unless
--ray_address (or $RAY_ADDRESS) names a cluster. Re-running with the same inputs (paths, sizes, versions)
and settings is a no-op; an interrupted run resumes, keeping the shards it verified; the store is published
atomically (metadata.json last). See docs/data.md. The work is the library call
`yanjax.data.prepare.prepare_store`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from yanjax.core import cli
from yanjax.core.cli import USAGE_EXIT_CODE
from yanjax.core.errors import UserError
from yanjax.data import sources, tokenizer
from yanjax.data.prepare import DEFAULT_VOCAB_SIZE, TOKEN_DTYPES, PrepareSettings, prepare_store

_DEFAULTS = PrepareSettings(output="")


def build_parser() -> argparse.ArgumentParser:
  """Flags named as PrepareSettings' fields; an absent flag keeps the field's default."""
  parser = argparse.ArgumentParser(
      prog="python -m data_pipelines.prepare", description=__doc__, argument_default=argparse.SUPPRESS,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("inputs", nargs="*", default=(), help="text files, directories, globs, .jsonl[.gz], "
                      ".parquet; local or gs:// / s3:// (default, with no --hf_dataset: the .py files of the "
                      "running Python's standard library)")
  parser.add_argument("--hf_dataset", dest="hf_datasets", action="append",
                      help="a Hugging Face dataset: a save_to_disk directory, .parquet/.arrow files (a glob), or a "
                      "hub name (needs network); repeat for several")
  parser.add_argument("--hf_config", help="the hub datasets' configuration name")
  parser.add_argument("--hf_split", help=f"the datasets' split (default {_DEFAULTS.hf_split!r})")
  parser.add_argument("--output", required=True, help="directory of the store to publish: a local path, "
                      "gs://bucket/path or s3://bucket/path")
  parser.add_argument("--vocab_size", type=int,
                      help=f"pieces of the trained tokenizer (default {DEFAULT_VOCAB_SIZE}); with "
                      "--tokenizer_model it must equal that model's size")
  parser.add_argument("--tokenizer_type", choices=tokenizer.MODEL_TYPES,
                      help=f"default {_DEFAULTS.tokenizer_type}")
  parser.add_argument("--tokenizer_model",
                      help="use this sentencepiece .model or Hugging Face tokenizer.json (local, gs:// or s3://) "
                      "instead of training one")
  parser.add_argument("--tokenizer_sample_bytes", type=int,
                      help="bytes of text (drawn from every input shard) the tokenizer trains on "
                      f"(default {_DEFAULTS.tokenizer_sample_bytes:,})")
  parser.add_argument("--text_field", help=f"JSONL field / Parquet or dataset column with the text (default "
                      f"{_DEFAULTS.text_field!r})")
  parser.add_argument("--text_sample_by", choices=sources.SAMPLE_BY,
                      help="a plain-text file's documents: the whole file, paragraphs (blank-line separated) or "
                      f"lines (default {_DEFAULTS.text_sample_by!r})")
  parser.add_argument("--validation_fraction", type=float,
                      help=f"fraction of documents held out for validation (default {_DEFAULTS.validation_fraction})")
  parser.add_argument("--seed", type=int, help=f"seed of the validation split (default {_DEFAULTS.seed})")
  parser.add_argument("--dedup", action="store_true",
                      help="remove documents whose exact text occurred earlier in the corpus (counted)")
  parser.add_argument("--on_bad_input", choices=sources.BAD_INPUT_POLICIES,
                      help="unreadable / non-UTF-8 input and malformed JSONL lines or Parquet files: skip and count, "
                      f"or fail (default: {_DEFAULTS.on_bad_input})")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing store prepared from other inputs or settings")
  parser.add_argument("--token_dtype", choices=TOKEN_DTYPES,
                      help="stored id type (default auto: uint16 when the vocabulary fits, else uint32)")
  parser.add_argument("--input_shard_bytes", type=int,
                      help="input bytes one task reads: whole files are grouped up to it, datasets cut into row "
                      "ranges of it (default: 1/64 of the corpus, within 1 MiB..256 MiB)")
  parser.add_argument("--ray_address", help="the Ray cluster to run on, e.g. auto or ray://head:10001 (default: "
                      "$RAY_ADDRESS, else Ray started on this machine)")
  parser.add_argument("--num_workers", type=int,
                      help="tasks at once (default: every CPU of the cluster, or of this machine)")
  parser.add_argument("--max_unit_tries", type=int,
                      help="tries of an input shard whose Ray worker dies (killed for memory, or crashed) before "
                      f"the run fails naming it (default {_DEFAULTS.max_unit_tries})")
  parser.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bars")
  return parser


def parse_settings(argv: Sequence[str] | None = None) -> PrepareSettings:
  """The settings the command line `argv` asks for (argparse exits with usage on a malformed one)."""
  args = vars(build_parser().parse_args(argv))
  return PrepareSettings(**{**args, "inputs": tuple(args["inputs"]),
                             "hf_datasets": tuple(args.get("hf_datasets", ()))})


def main(argv: Sequence[str] | None = None) -> int:
  settings = parse_settings(argv)
  try:
    prepare_store(settings)
  except UserError as e:  # a bad setting, corpus or store; a bad URL or unreachable storage
    print(f"error: {e}", file=sys.stderr)
    return USAGE_EXIT_CODE
  return 0


if __name__ == "__main__":
  cli.run(main)
