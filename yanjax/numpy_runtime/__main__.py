"""Generate text from an export with NumPy only.

    python -m yanjax.numpy_runtime --export exports/tiny --prompt "Once upon a time" --max_new_tokens 64
    python -m yanjax.numpy_runtime --export s3://bucket/exports/tiny --prompt "def main("   # needs etils, s3fs
"""

from __future__ import annotations

import argparse
import sys

from yanjax.core import cli  # plain Python: the runtime still needs NumPy only

from .format import ExportError, load_export
from .generate import generate
from .model import Model, config_summary


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m yanjax.numpy_runtime", description=__doc__.splitlines()[0])
  parser.add_argument("--export", required=True, help="export directory (python -m yanjax.main.export): a path, "
                      "or a gs:// or s3:// URL")
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  cli.check_generation_flags(args.max_new_tokens, args.temperature, args.top_k, args.top_p)

  # A sentencepiece model or a tokenizer.json (NumPy, sentencepiece and tokenizers only; no JAX).
  from yanjax.data.tokenizer import FILE_NAMES  # pylint: disable=import-outside-toplevel
  from yanjax.data.tokenizer import read as read_tokenizer  # pylint: disable=import-outside-toplevel

  export = load_export(args.export)
  if export.tokenizer_path is None:
    raise ExportError(f"{args.export} has no {' or '.join(FILE_NAMES.values())}: export from a run that has one")
  tokenizer = read_tokenizer(export.tokenizer_path)  # a path or a URL
  kind = export.manifest["tokenizer"].get("kind", "sentencepiece")  # exports before tokenizer.json: sentencepiece
  if tokenizer.kind != kind:
    raise ExportError(f"{export.tokenizer_path}: a {tokenizer.kind} tokenizer, but the manifest says {kind}")
  model = Model(export)
  print(config_summary(export.config), file=sys.stderr)
  prompt = [tokenizer.bos_id] + tokenizer.encode(args.prompt)
  ids, shown = [], ""

  def stream(tokens, emitted):
    nonlocal shown
    if emitted[0]:
      ids.append(int(tokens[0]))
      text = tokenizer.decode(ids)
      if not text.endswith("\ufffd") and text.startswith(shown):
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text

  generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
           top_p=args.top_p, eos_id=tokenizer.eos_id, seed=args.seed, vocab_limit=tokenizer.vocab_size,
           on_tokens=stream)
  text = tokenizer.decode(ids)
  sys.stdout.write((text[len(shown):] if text.startswith(shown) else "") + "\n")


if __name__ == "__main__":
  cli.run(main, (ExportError,))
