"""What weight-only int8 export costs (issue #28, item 1): validation loss, greedy agreement and file sizes.

For each trained run given: export it as float32 and as int8 (`--quantize int8`, .npz), load both with the NumPy
runtime, and print one JSON line with
  - the validation loss (nats/token) of each on the same `--batches` batches of the run's validation split
    (the NumPy runtime's forward over the packed rows, the trainer's loss mask), and the difference;
  - greedy-decode agreement: `--prompts` prompts (the first `--prompt_len` tokens of validation rows), each
    continued by `--new_tokens` greedy tokens by both exports: the fraction of identical tokens position by
    position, and the mean number of tokens before the first difference;
  - the weights files' sizes and their ratio.

    python benchmarks/quantize.py --store /tmp/q/stdlib --runs mcsd=/tmp/q/mcsd mcsd_dd=/tmp/q/mcsd_dd \
        selective=/tmp/q/selective attention=/tmp/q/attention hybrid=/tmp/q/hybrid

The store must be the one the runs trained on; seq_len, batch and seed are the trainer's (yan_tiny: 128, 16, 0).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from yanjax.data.loader import make_loader
from yanjax.export.writer import export_model
from yanjax.inference.loading import load_inference_model
from yanjax.numpy_runtime import Model, generate, load_export


def validation_loss(model: Model, batches: list[dict]) -> float:
  """Mean next-token NLL (nats) over the masked targets of `batches`, with the NumPy runtime's forward."""
  nll, tokens = 0.0, 0.0
  for batch in batches:
    logits = model.forward(batch["inputs"], batch["segment_ids"], batch["positions"]).astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
    target = np.take_along_axis(logits, batch["targets"][..., None].astype(np.int64), -1)[..., 0]
    mask = batch["loss_mask"].astype(np.float64)
    nll += float(np.sum((logz - target) * mask))
    tokens += float(mask.sum())
  return nll / tokens


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", nargs="+", required=True, help="label=workdir of each trained run")
  parser.add_argument("--store", required=True, help="the token store the runs trained on")
  parser.add_argument("--out", default="/tmp/q/exports", help="where the exports are written")
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--global_batch", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batches", type=int, default=8, help="validation batches")
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=16)
  parser.add_argument("--new_tokens", type=int, default=64)
  args = parser.parse_args()

  loader = make_loader([args.store], split="validation", seq_len=args.seq_len, global_batch=args.global_batch,
                       seed=args.seed)
  batches = [loader.batch(step) for step in range(args.batches)]
  prompts = [list(map(int, row[:args.prompt_len])) for row in batches[0]["inputs"][:args.prompts]]
  for run in args.runs:
    label, workdir = run.split("=", 1)
    model, cfg, _ = load_inference_model(workdir)
    result = {"model": label, "workdir": workdir, "pattern": list(cfg.pattern), "router": cfg.router,
              "validation_tokens": int(sum(b["loss_mask"].sum() for b in batches))}
    runtimes, sizes = {}, {}
    for kind, quantize in (("float32", None), ("int8", "int8")):
      path = pathlib.Path(args.out) / f"{label}_{kind}"
      manifest = export_model(model, cfg, path, quantize=quantize)
      sizes[kind] = manifest["files"]["weights.npz"]["bytes"]
      runtimes[kind] = Model(load_export(path))
    result["parameters"] = int(sum(a.size for a in runtimes["float32"].w.values()))
    start = time.perf_counter()
    for kind, runtime in runtimes.items():
      result[f"val_loss_{kind}"] = round(validation_loss(runtime, batches), 5)
    result["val_loss_diff"] = round(result["val_loss_int8"] - result["val_loss_float32"], 5)
    completions = {kind: np.array([c.tokens for c in generate(runtime, prompts, max_new_tokens=args.new_tokens)])
                   for kind, runtime in runtimes.items()}
    same = completions["float32"] == completions["int8"]
    first_difference = [int(np.argmin(row)) if not row.all() else len(row) for row in same]
    result["greedy_agreement"] = round(float(same.mean()), 4)
    result["greedy_tokens_before_first_difference"] = round(float(np.mean(first_difference)), 2)
    result["greedy_identical_prompts"] = int(same.all(1).sum())
    result.update(weights_bytes_float32=sizes["float32"], weights_bytes_int8=sizes["int8"],
                  size_ratio=round(sizes["float32"] / sizes["int8"], 3),
                  seconds=round(time.perf_counter() - start, 1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
