"""Prepares a token store from a text corpus: tokenizer, train/validation token arrays, metadata.

  python -m data_pipelines.prepare --output data/stdlib --vocab_size 2048            # Python stdlib
  python -m data_pipelines.prepare --output data/web --vocab_size 32000 'shards/*.jsonl.gz'
  python -m data_pipelines.prepare --output s3://bucket/stores/stdlib --vocab_size 2048  # or gs://

With no inputs it reads the running Python's standard-library sources. Re-running with the same inputs
(paths, sizes, mtimes) and settings is a no-op; the store is published atomically (on object stores:
metadata.json last). See docs/data.md. The work is the library call `yanjax.data.prepare.prepare_store`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from yanjax.core import cli
from yanjax.core.cli import USAGE_EXIT_CODE
from yanjax.core.errors import UserError
from yanjax.data import sources, tokenizer
from yanjax.data.prepare import DEFAULT_VOCAB_SIZE, PrepareSettings, prepare_store

_DEFAULTS = PrepareSettings(output="")


def build_parser() -> argparse.ArgumentParser:
  """Flags named as PrepareSettings' fields; an absent flag keeps the field's default."""
  parser = argparse.ArgumentParser(
      prog="python -m data_pipelines.prepare", description=__doc__, argument_default=argparse.SUPPRESS,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("inputs", nargs="*", default=(), help="text files, directories, globs, .jsonl[.gz], "
                      ".parquet (default: the .py files of the running Python's standard library)")
  parser.add_argument("--output", required=True, help="directory of the store to publish: a local path, "
                      "gs://bucket/path or s3://bucket/path")
  parser.add_argument("--vocab_size", type=int,
                      help=f"pieces of the trained tokenizer (default {DEFAULT_VOCAB_SIZE}); with "
                      "--tokenizer_model it must equal that model's size")
  parser.add_argument("--tokenizer_type", choices=tokenizer.MODEL_TYPES,
                      help=f"default {_DEFAULTS.tokenizer_type}")
  parser.add_argument("--tokenizer_model",
                      help="reuse this sentencepiece .model (local, gs:// or s3://) instead of training one")
  parser.add_argument("--tokenizer_sample_bytes", type=int,
                      help="bytes of text (from files in seeded random order) the tokenizer trains on "
                      f"(default {_DEFAULTS.tokenizer_sample_bytes:,})")
  parser.add_argument("--text_field", help=f"JSONL field / Parquet column with the text (default "
                      f"{_DEFAULTS.text_field!r})")
  parser.add_argument("--validation_fraction", type=float,
                      help=f"fraction of documents held out for validation (default {_DEFAULTS.validation_fraction})")
  parser.add_argument("--seed", type=int, help=f"seed of the validation split and the sample (default "
                      f"{_DEFAULTS.seed})")
  parser.add_argument("--on_bad_input", choices=sources.BAD_INPUT_POLICIES,
                      help="unreadable / non-UTF-8 files and malformed JSONL lines: skip and count, "
                      f"or fail (default: {_DEFAULTS.on_bad_input})")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing store prepared from other inputs or settings")
  parser.add_argument("--num_threads", type=int,
                      help="tokenizer threads (default: all cores this process may use)")
  return parser


def parse_settings(argv: Sequence[str] | None = None) -> PrepareSettings:
  """The settings the command line `argv` asks for (argparse exits with usage on a malformed one)."""
  args = vars(build_parser().parse_args(argv))
  return PrepareSettings(**{**args, "inputs": tuple(args["inputs"])})


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
