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
from yanjax.core.errors import UserError
from yanjax.data.errors import TokenizerMismatchError
from yanjax.data.tokenizer import FILE_NAMES, Tokenizer
from yanjax.data.tokenizer import read as read_tokenizer
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
  args = parser.parse_args(argv)
  cli.check_generation_flags(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
  if args.prompt_ids is not None:
    token_ids(args.prompt_ids)
  return args


def token_ids(text: str) -> list[int]:
  """The token ids of a --prompt_ids value ('1,42,7'); a UserError naming the part that is not an id."""
  ids = []
  for part in (p.strip() for p in text.split(",")):
    if part and not part.isdecimal():
      raise UserError(f"--prompt_ids {text}: {part!r} is not a token id; give comma-separated integers >= 0, "
                      "e.g. --prompt_ids 1,42,7")
    ids += [int(part)] if part else []
  if not ids:
    raise UserError(f"--prompt_ids {text!r}: no token ids; give comma-separated integers >= 0, e.g. 1,42,7")
  return ids


def run(model, tokenizer_path, args, out=None, err=None) -> None:
  """The CLI after loading: generates for `args` (parsed flags) and writes the results to `out` (stdout).

  `tokenizer_path`: the run's tokenizer.model or tokenizer.json (a path, a gs:// / s3:// URL, or an epath), or
  None. A tokenizer with more ids than the model's vocabulary is refused (TokenizerMismatchError).
  """
  out = sys.stdout if out is None else out
  err = sys.stderr if err is None else err
  tokenizer = None if tokenizer_path is None else _load_tokenizer(tokenizer_path, model.cfg.vocab_size)
  sampling = Sampling(args.temperature, args.top_k, args.top_p)
  if args.prompt_ids is not None:
    prompt = token_ids(args.prompt_ids)
    eos, limit = (None, None) if tokenizer is None else (tokenizer.eos_id, tokenizer.vocab_size)
    def stream(tokens, emitted):
      out.write("".join(f"{t} " for t in tokens[emitted]))
    (completion,) = generate(model, [prompt], max_new_tokens=args.max_new_tokens, sampling=sampling,
                             eos_id=eos, seed=args.seed, vocab_limit=limit, on_tokens=stream)
    out.write(f"\n[{completion.stop_reason}]\n")
    return
  if tokenizer is None:
    raise TokenizerMismatchError(f"{args.workdir} has no {' or '.join(FILE_NAMES.values())}: give --prompt_ids "
                                 "instead of text")
  eos = tokenizer.eos_id
  limit = tokenizer.vocab_size  # the model's vocabulary may be padded past the tokenizer's

  def encode(text):
    return ([] if args.no_bos else [tokenizer.bos_id]) + tokenizer.encode(text)

  if args.prompt is not None:
    streamer = TextStreamer(tokenizer, 1)

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
    streamer = TextStreamer(tokenizer, len(batch))

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
    out.write(json.dumps({"index": i, "prompt": text, "completion": tokenizer.decode(c.tokens),
                          "tokens": c.tokens, "stop_reason": c.stop_reason}, ensure_ascii=False) + "\n")


def _load_tokenizer(path, model_vocab_size: int) -> Tokenizer:
  """The tokenizer file at `path` (local, gs:// or s3://); refused when it has ids the model lacks."""
  tokenizer = read_tokenizer(storage.as_path(path))
  if tokenizer.vocab_size > model_vocab_size:
    raise TokenizerMismatchError(f"{path} has {tokenizer.vocab_size} ids but the checkpoint's model has "
                                 f"vocab_size {model_vocab_size}: use the tokenizer the run was trained with")
  return tokenizer


def main(argv=None) -> None:
  args = _parse(argv)
  from yanjax.inference.loading import load_inference_model  # pylint: disable=import-outside-toplevel
  model, _, tokenizer_path = load_inference_model(args.workdir, mesh_spec=args.mesh)
  run(model, tokenizer_path, args)


if __name__ == "__main__":
  cli.run(main)
