"""Passkey retrieval by context length for trained runs of every family (yanjax/eval/passkey.py), side by side.

Each run (a training work directory) is asked the same trials: a 5-digit key stated once at a depth of a
haystack of real text (the validation documents of --store, which must be tokenized as the runs were), then
asked for at the end of a sequence of --contexts tokens. A trial counts as retrieved when every digit of the key
is the model's argmax. An attention run answers only contexts its KV cache holds (model.max_decode_len); longer
ones are reported as "does not fit".

Writes <out>/passkey.jsonl (one line per run, context and depth; also printed), <out>/passkey.md (per run and
context, over the depths: trials retrieved, and the needle's gain, how many nats more likely the answer is after
a needle stating it than after one stating another key) and <out>/passkey.png (accuracy against context, one line per
family, in the A/B report's colours).

Run: python benchmarks/passkey.py --out runs/passkey --store runs/ab/data/stdlib \\
       --runs mcsd=runs/pk/mcsd,attention=runs/pk/attention [--contexts 256,1024,4096,16384,32768]
       [--depths 0,0.25,0.5,0.75,1] [--trials 4]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from ab_report import FAMILY_ORDER, family_style  # noqa: E402  (benchmarks/, beside this file)

from yanjax.core import cli, storage  # noqa: E402
from yanjax.core.errors import UserError  # noqa: E402
from yanjax.data import tokenizer as tokenization  # noqa: E402
from yanjax.data.store import open_store  # noqa: E402
from yanjax.eval.passkey import haystack_ids, passkey_accuracy  # noqa: E402
from yanjax.eval.scoring import JaxBackend  # noqa: E402
from yanjax.inference.loading import load_inference_model  # noqa: E402


def parse_runs(text: str) -> dict[str, str]:
  """"family=workdir,..." -> {family: workdir}; a family is one of the A/B report's (it sets the colour)."""
  runs = {}
  for item in filter(None, text.split(",")):
    family, sep, workdir = item.partition("=")
    if not sep or family not in FAMILY_ORDER or not workdir:
      raise UserError(f"--runs item {item!r}: write family=workdir with family one of {list(FAMILY_ORDER)}")
    runs[family] = workdir
  if not runs:
    raise UserError("--runs is empty: name at least one family=workdir")
  return runs


def numbers(text: str, kind, what: str) -> list:
  try:
    values = [kind(v) for v in text.split(",") if v]
  except ValueError:
    raise UserError(f"--{what}={text!r}: give numbers, comma-separated") from None
  if not values:
    raise UserError(f"--{what} is empty")
  return values


def table(rows: list[dict], contexts: list[int]) -> list[str]:
  """Markdown: per run and context, "retrieved/trials, mean needle gain in nats" over the depths."""
  lines = ["| run | " + " | ".join(f"{c:,}" for c in contexts) + " |", "| --- |" + " ---: |" * len(contexts)]
  for family in dict.fromkeys(r["family"] for r in rows):
    cells = []
    for context in contexts:
      at = [r for r in rows if r["family"] == family and r["context"] == context]
      cells.append("does not fit" if not at[0]["fits"] else
                   f"{sum(r['retrieved'] for r in at)}/{sum(r['trials'] for r in at)}, "
                   f"{np.mean([r['needle_gain'] for r in at]):+.2f}")
    lines.append(f"| {family} | " + " | ".join(cells) + " |")
  return lines


def plot(rows: list[dict], contexts: list[int], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  figure, ax = plt.subplots(figsize=(6, 4))
  for family in dict.fromkeys(r["family"] for r in rows):
    points = [(c, np.mean([r["accuracy"] for r in rows if r["family"] == family and r["context"] == c]))
              for c in contexts if any(r["fits"] for r in rows if r["family"] == family and r["context"] == c)]
    colour = family_style(FAMILY_ORDER.index(family))[0](0.7)
    ax.plot([c for c, _ in points], [a for _, a in points], marker="o", color=colour, label=family)
  ax.set_xscale("log", base=2)
  ax.set_ylim(-0.05, 1.05)
  ax.set_xlabel("context (tokens)")
  ax.set_ylabel("passkey retrieved (fraction of trials)")
  ax.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="directory of passkey.jsonl, passkey.md, passkey.png")
  parser.add_argument("--store", required=True, help="a token store whose validation documents are the haystack")
  parser.add_argument("--runs", required=True, help="family=workdir,... (families: mcsd, selective, mcsd_dd, "
                                                    "attention)")
  parser.add_argument("--contexts", default="256,1024,4096,16384,32768")
  parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
  parser.add_argument("--trials", type=int, default=4, help="trials per context and depth")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--window", type=int, default=1024, help="tokens per prefill through the state or cache")
  args = parser.parse_args(argv)

  def run() -> int:
    runs = parse_runs(args.runs)
    contexts, depths = numbers(args.contexts, int, "contexts"), numbers(args.depths, float, "depths")
    store = open_store(args.store)
    haystack = haystack_ids(store, max(contexts))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family, workdir in runs.items():
      found = tokenization.find_file(storage.as_path(workdir))
      if found is None:
        raise UserError(f"{workdir} holds no tokenizer.model or tokenizer.json: give a training run's workdir")
      tokenizer = tokenization.read(found)
      if tokenizer.sha256 != store.tokenizer_sha256:
        raise UserError(f"{workdir} was trained with another tokenizer than {args.store}'s: give the store it was "
                        "trained on (or one prepared with its tokenizer)")
      model, _, _ = load_inference_model(workdir)
      for row in passkey_accuracy(JaxBackend(model), tokenizer, haystack, contexts, depths, args.trials,
                                  args.seed, window=args.window):
        rows.append({"family": family, "workdir": workdir, **row})
        print(json.dumps(rows[-1]), flush=True)
    storage.write_atomic(out / "passkey.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    storage.write_atomic(out / "passkey.md", "\n".join(table(rows, contexts)) + "\n")
    plot(rows, contexts, out / "passkey.png")
    print(f"wrote {out}/passkey.jsonl, passkey.md, passkey.png")
    return 0

  return cli.run(run)


if __name__ == "__main__":
  sys.exit(main())
