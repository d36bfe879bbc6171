"""The `python -m yanjax.main.generate` command.

Text generation: prompts -> completions with the model's O(1) MCSD state or the attention KV cache.

The work is the library yanjax.inference.generate (usage in its docstring).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from yanjax.core import cli, storage
from yanjax.inference.generate import TextStreamer, generate
from yanjax.inference.sampling import Sampling


def _parse(argv):
  parser = argparse.ArgumentParser(prog="python -m yanjax.main.generate", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="training run directory, local or gs:// / s3:// "
                      "(latest checkpoint is used)")
  parser.add_argument("--mesh", default=None, help="mesh to restore onto, e.g. fsdp=4 or data=1,fsdp=-1 "
                      "(default: the run's training mesh, or FSDP over all devices when it does not fit)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", help="one prompt, streamed to stdout")
  source.add_argument("--prompts_file", help="a text file with one prompt per line; JSON lines out")
  source.add_argument("--prompt_ids", help="one prompt as comma-separated token ids (no tokenizer needed)")
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top_k", type=int, default=0, help="0 = off")
  parser.add_argument("--top_p", type=float, default=1.0, help="1 = off")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_size", type=int, default=8, help="prompts per batch (--prompts_file)")
  parser.add_argument("--no_bos", action="store_true", help="do not start prompts with the bos id")
  parser.add_argument("--stream", action="store_true", help="with --prompts_file: stream text to stderr")
  return parser.parse_args(argv)


def run(model, tokenizer_path, args, out=None, err=None) -> None:
  """The CLI after loading: generates for `args` (parsed flags) and writes the results to `out` (stdout).

  `tokenizer_path`: the run's sentencepiece model (a path, a gs:// / s3:// URL, or an epath), or None.
  """
  out = sys.stdout if out is None else out
  err = sys.stderr if err is None else err
  sampling = Sampling(args.temperature, args.top_k, args.top_p)
  if args.prompt_ids is not None:
    prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    eos = limit = None
    if tokenizer_path is not None:
      processor = _load_tokenizer(tokenizer_path)
      eos, limit = processor.eos_id(), processor.vocab_size()
    def stream(tokens, emitted):
      out.write("".join(f"{t} " for t in tokens[emitted]))
    (completion,) = generate(model, [prompt], max_new_tokens=args.max_new_tokens, sampling=sampling,
                             eos_id=eos if eos is not None and eos >= 0 else None, seed=args.seed,
                             vocab_limit=limit, on_tokens=stream)
    out.write(f"\n[{completion.stop_reason}]\n")
    return
  if tokenizer_path is None:
    raise SystemExit(f"{args.workdir} has no tokenizer.model: give --prompt_ids instead of text")
  processor = _load_tokenizer(tokenizer_path)
  eos = processor.eos_id() if processor.eos_id() >= 0 else None
  limit = processor.vocab_size()  # the model's vocabulary may be padded past the tokenizer's

  def encode(text):
    ids = processor.encode(text)
    return ([processor.bos_id()] if processor.bos_id() >= 0 and not args.no_bos else []) + ids

  if args.prompt is not None:
    streamer = TextStreamer(processor, 1)

    def stream(tokens, emitted):
      if emitted[0]:
        out.write(streamer.push(0, tokens[0]))
        out.flush()

    (completion,) = generate(model, [encode(args.prompt)], max_new_tokens=args.max_new_tokens,
                             sampling=sampling, eos_id=eos, seed=args.seed, vocab_limit=limit,
                             on_tokens=stream)
    out.write(streamer.flush(0) + "\n")
    return

  text = storage.as_path(args.prompts_file).read_text(encoding="utf-8").replace("\r\n", "\n")
  texts = text.split("\n")[:-1] if text.endswith("\n") or not text else text.split("\n")
  encoded = [encode(t) for t in texts]
  order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
  results = {}
  for start in range(0, len(order), args.batch_size):
    batch = order[start:start + args.batch_size]
    streamer = TextStreamer(processor, len(batch))

    def stream(tokens, emitted, batch=batch, streamer=streamer):
      for row in np.flatnonzero(emitted[:len(batch)]):
        piece = streamer.push(row, tokens[row])
        if piece:
          err.write(f"[{batch[row]}] {piece!r}\n")

    filler = [batch[0]] * (args.batch_size - len(batch))  # same shapes as the full batches; dropped below
    completions = generate(model, [encoded[i] for i in batch + filler], max_new_tokens=args.max_new_tokens,
                           sampling=sampling, eos_id=eos, seed=args.seed, row_seeds=batch + filler,
                           vocab_limit=limit, on_tokens=stream if args.stream else None)
    results.update(zip(batch, completions))
  for i, text in enumerate(texts):
    c = results[i]
    out.write(json.dumps({"index": i, "prompt": text, "completion": processor.decode(c.tokens),
                          "tokens": c.tokens, "stop_reason": c.stop_reason}, ensure_ascii=False) + "\n")


def _load_tokenizer(path):
  """The sentencepiece model at `path` (local, gs:// or s3://), read through epath."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  return spm.SentencePieceProcessor(model_proto=storage.as_path(path).read_bytes())


def main(argv=None) -> None:
  args = _parse(argv)
  from yanjax.inference.loading import load_inference_model  # pylint: disable=import-outside-toplevel
  model, _, tokenizer_path = load_inference_model(args.workdir, mesh_spec=args.mesh)
  run(model, tokenizer_path, args)


if __name__ == "__main__":
  cli.run(main)
