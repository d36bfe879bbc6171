"""A/B of the token mixers on real text: MCSD, MCSD with selective activation, MCSD with data-dependent decay, the
parameter-matched attention baseline and the hybrid (MCSD and sliding-window attention layers alternating,
`configs/yan_tiny.py:hybrid`), trained on the same data, tokenizer, steps and hardware in one run.

For every corpus, size and seed it trains each family in turn (the families of one seed back to back, so slow
spells of a shared machine fall on all of them) with the trainer of yanjax.main.train (yanjax/training/), and
evaluates every `--eval_every` steps on the same validation batches: loss and next-token accuracy, against
tokens, training FLOPs (yanjax/model/counting.py) and training seconds (the first, compiling step and the
evaluations excluded). Then it times decoding by context for every family and size (benchmarks/decode.py).

Corpora (no download; prepared with the project's pipeline into <out>/data/<corpus>, one tokenizer each):
  stdlib  the Python standard library's source files (code; PSF licence), as README command 1 uses.
  pydocs  the Python 3.11 documentation as prose: the reStructuredText sources that Debian's python3.11-doc
          installs under /usr/share/doc/python3.11/html/_sources (497 files, 1.4M words; PSF License Agreement,
          /usr/share/doc/python3.11-doc/copyright). Install it with `apt-get install python3.11-doc`.

Writes <out>/runs/<corpus>-<size>-<family>-s<seed>.json (one per run, whole or not at all; a re-run skips
finished runs), <out>/decode.jsonl, then the report (benchmarks/ab_report.py): <out>/ab.jsonl, <out>/report.md
and the figures <out>/*.png. Prints each record as a JSON line.

Run: python benchmarks/ab.py --out runs/ab [--corpora stdlib,pydocs] [--sizes w64,w128] [--seeds 0,1]
     [--families mcsd,selective,mcsd_dd,attention,hybrid] [--steps 300] [--seq_len 128] [--window 256]
     [--pattern swa,mcsd]
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys
import time
from typing import Any, Callable, NamedTuple

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ab_report import FAMILY_ORDER, write_report  # noqa: E402  (benchmarks/, beside this file)
from decode import state_bytes, time_decode  # noqa: E402

from yanjax.core import storage  # noqa: E402
from yanjax.core.config import load_config_file  # noqa: E402
from yanjax.core.errors import UserError  # noqa: E402
from yanjax.data import tokenizer  # noqa: E402
from yanjax.data.loader import make_loader  # noqa: E402
from yanjax.data.prepare import PrepareSettings, prepare_store  # noqa: E402
from yanjax.model.counting import flops_per_token, param_count  # noqa: E402
from yanjax.training.loop import StepInfo, TrainLoop  # noqa: E402
from yanjax.training.presets import model_variant  # noqa: E402
from yanjax.training.run_config import validate_run_config  # noqa: E402
from yanjax.training.train_step import eval_scalars, with_target_bytes  # noqa: E402
from yanjax.training.trainer import build_trainer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/yan_tiny.py"  # every family is a variant of this config's Yan model
PYDOCS = pathlib.Path("/usr/share/doc/python3.11/html/_sources")


class Corpus(NamedTuple):
  inputs: tuple[str, ...]  # the pipeline's inputs; () is the Python standard library
  missing_hint: str  # how to get the inputs when they are absent ("" when they always exist)


CORPORA = {
    "stdlib": Corpus((), ""),
    "pydocs": Corpus((str(PYDOCS),), "install Debian's python3.11-doc (apt-get install python3.11-doc)"),
}
FAMILIES = dict(zip(FAMILY_ORDER, ("", "selective", "mcsd_dd", "attention", "hybrid")))  # -> config variant
SIZES = {  # overrides of configs/yan_tiny.py's model (vocabulary 2048)
    "w64": dict(width=64, channels=4, mlp_width=192, layers=2),
    "w128": dict(width=128, channels=4, mlp_width=384, layers=2),
    "w192": dict(width=192, channels=4, mlp_width=576, layers=3),
}


def prepare_corpus(name: str, out: pathlib.Path, vocab_size: int, validation_fraction: float) -> pathlib.Path:
  """The token store of corpus `name` under <out>/data (prepared once, then reused)."""
  corpus = CORPORA[name]
  for path in corpus.inputs:
    if not pathlib.Path(path).exists():
      raise UserError(f"corpus {name!r} reads {path}, which does not exist: {corpus.missing_hint}")
  store = out / "data" / name
  prepare_store(PrepareSettings(output=str(store), inputs=corpus.inputs, vocab_size=vocab_size,
                                validation_fraction=validation_fraction))
  return store


def prepared_store(data: pathlib.Path, name: str) -> pathlib.Path:
  """<data>/<name>, the token store of corpus `name` an earlier run prepared (--data), used as it is."""
  store = data / name
  if not (store / "metadata.json").is_file():
    raise UserError(f"--data={data}: {store} is not a prepared token store (an earlier run's <out>/data holds one "
                    "per corpus)")
  return store


def run_config(family: str, size: str, seed: int, store: pathlib.Path, args) -> Any:
  """The run config of one A/B run: configs/yan_tiny.py's training settings, the family's model at `size`."""
  cfg = load_config_file(str(CONFIG))
  model = model_variant({**cfg.model.to_dict(), **SIZES[size]}, FAMILIES[family], args.seq_len)
  if family == "hybrid" and (args.window or args.pattern):
    model = model.replace(**({"window": args.window} if args.window else {}),
                          **({"pattern": tuple(args.pattern.split(","))} if args.pattern else {}))
  cfg.model.update(model.to_dict())
  tokens_per_step = cfg.train.global_batch * cfg.train.seq_len  # kept at any --seq_len
  if args.seq_len <= 0 or tokens_per_step % args.seq_len:
    raise UserError(f"--seq_len={args.seq_len}: must divide {tokens_per_step}, the tokens of every step")
  cfg.train.update(dict(seq_len=args.seq_len, global_batch=tokens_per_step // args.seq_len,
                        seed=seed, steps=args.steps, eval_every=args.eval_every, eval_batches=args.eval_batches,
                        sample_tokens=0, compilation_cache=""))
  cfg.optimizer.warmup_steps = args.warmup_steps
  cfg.data.stores = (str(store),)
  cfg.data.prepare_default = False
  return cfg


class Curve:
  """A hook (every step) that clocks training and, every `eval_every` steps and at the last, appends
  {"step", "seconds", **evaluate(info)} to `points`.

  Training seconds start after step 1 (which compiles) and stop around each evaluation; the clock reads
  after the state is ready, so dispatch-ahead never hides work. benchmarks/recall.py uses it too."""

  def __init__(self, evaluate: Callable[[StepInfo], dict], eval_every: int):
    self.evaluate, self.eval_every = evaluate, eval_every
    self.started = time.perf_counter()
    self.compile_seconds = self.train_seconds = self.clock = 0.0
    self.points: list[dict] = []

  def __call__(self, info: StepInfo):
    if info.step == 1:
      jax.block_until_ready(info.state)
      self.clock = time.perf_counter()
      self.compile_seconds = self.clock - self.started
    if info.step % self.eval_every and not info.last:
      return
    jax.block_until_ready(info.state)
    self.train_seconds += time.perf_counter() - self.clock
    self.points.append({"step": info.step, "seconds": round(self.train_seconds, 3), **self.evaluate(info)})
    self.clock = time.perf_counter()


def train_run(cfg) -> dict[str, Any]:
  """Trains run config `cfg` from scratch and returns its record (curve included)."""
  trainer = build_trainer(cfg)
  model_cfg = trainer.model_cfg
  common = dict(seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch, seed=cfg.train.seed,
                expected_vocab_size=model_cfg.vocab_size)
  train_loader = make_loader(list(cfg.data.stores), split="train", **common)
  val_loader = make_loader(list(cfg.data.stores), split="validation", **common)
  token_bytes = tokenizer.from_bytes(val_loader.tokenizer_bytes(), str(cfg.data.stores[0])).token_bytes()
  val_batches = [trainer.to_global(with_target_bytes(val_loader.batch(i), token_bytes))
                 for i in range(cfg.train.eval_batches)]
  fpt = flops_per_token(model_cfg, cfg.train.seq_len)

  def evaluate(info: StepInfo) -> dict:
    scalars = eval_scalars([jax.device_get(trainer.eval_step(info.state["params"], batch)) for batch in val_batches])
    tokens = info.step * trainer.global_batch * cfg.train.seq_len
    return {"tokens": tokens, "flops": tokens * fpt, "train_loss": float(info.metrics["loss"]),
            **{key: scalars[key] for key in ("val_loss", "val_accuracy", "val_bits_per_byte")}}

  curve = Curve(evaluate, cfg.train.eval_every)
  loop = TrainLoop(trainer, cfg.train)
  loop.add_hook(curve, every=1)
  loop.run(trainer.init(), 0, iter(train_loader.iterate(0)))
  count = param_count(model_cfg)
  final = curve.points[-1]
  return {"params": count.total, "active_params": count.active, "flops_per_token": fpt,
          "steps": cfg.train.steps, "tokens": final["tokens"], "val_loss": final["val_loss"],
          "val_accuracy": final["val_accuracy"], "val_bits_per_byte": final["val_bits_per_byte"],
          "compile_seconds": round(curve.compile_seconds, 3),
          "train_seconds": final["seconds"], "tokens_per_s": round(final["tokens"] / final["seconds"], 1),
          "curve": curve.points}


def decode_records(families: list[str], sizes: list[str], contexts: list[int], repeats: int, seq_len: int
                   ) -> list[dict]:
  """Decode latency and state bytes (batch 1) by context for every family and size (as trained on sequences of
  `seq_len`: the hybrid's window), on random weights."""
  base = load_config_file(str(CONFIG)).model.to_dict()
  records = []
  for size in sizes:
    for family in families:
      model = model_variant({**base, **SIZES[size]}, FAMILIES[family], seq_len)
      for context in contexts:
        seconds = time_decode(model, 1, context, repeats)
        records.append({"record": "decode", "size": size, "family": family, "context": context,
                        "ms_per_token": round(seconds * 1e3, 3), "tokens_per_s": round(1 / seconds, 1),
                        "state_bytes": state_bytes(model, 1, context)})
        print(json.dumps(records[-1]), flush=True)
  return records


def run_path(out: pathlib.Path, corpus: str, size: str, seed: int, family: str) -> pathlib.Path:
  """The record of one run under `out`."""
  return out / "runs" / f"{corpus}-{size}-{family}-s{seed}.json"


def refuse_other_settings(path: pathlib.Path, settings: dict) -> None:
  """A UserError when the run record at `path` exists and was trained with other settings (benchmarks/recall.py
  too)."""
  if path.exists() and json.loads(path.read_text())["settings"] != settings:
    raise UserError(f"{path} was trained with other settings: give another --out, or delete it to train it again")


def _names(text: str, allowed, what: str) -> list[str]:
  names = [name for name in text.split(",") if name]
  unknown = [name for name in names if name not in allowed]
  if unknown or not names:
    raise UserError(f"--{what}={text!r}: choose from {sorted(allowed)}, comma-separated")
  return names


def _ints(text: str, what: str) -> list[int]:
  try:
    return [int(value) for value in text.split(",")]
  except ValueError:
    raise UserError(f"--{what}={text!r}: give integers, comma-separated") from None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="directory of the results and the report")
  parser.add_argument("--corpora", default="stdlib,pydocs")
  parser.add_argument("--sizes", default="w64,w128")
  parser.add_argument("--families", default=",".join(FAMILIES))
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every run (2048 tokens each)")
  parser.add_argument("--seq_len", type=int, default=128, help="a divisor of 2048: every step holds 2048 tokens")
  parser.add_argument("--warmup_steps", type=int, default=30)
  parser.add_argument("--eval_every", type=int, default=30)
  parser.add_argument("--eval_batches", type=int, default=8, help="validation batches of 2048 tokens")
  parser.add_argument("--validation_fraction", type=float, default=0.03, help="documents held out per corpus")
  parser.add_argument("--data", default="", help="use the stores an earlier run prepared, <data>/<corpus>, as they "
                      "are (e.g. on a machine whose Python's standard library differs)")
  parser.add_argument("--window", type=int, default=0,
                      help="the hybrid's sliding window (0: its config variant's, min(1024, --seq_len))")
  parser.add_argument("--pattern", default="", help="the hybrid's layer pattern, comma-separated (e.g. swa,mcsd; "
                      "'': its config variant's, swa,mcsd)")
  parser.add_argument("--contexts", default="128,1024,8192", help="decode contexts ('' skips decoding)")
  parser.add_argument("--decode_repeats", type=int, default=10)
  args = parser.parse_args(argv)
  settings = {key: getattr(args, key) for key in ("steps", "seq_len", "warmup_steps", "eval_every", "eval_batches",
                                                 "validation_fraction")}
  settings.update({key: getattr(args, key) for key in ("window", "pattern") if getattr(args, key)})  # when set:
  # runs from before these options still match their settings
  try:
    corpora = _names(args.corpora, CORPORA, "corpora")
    sizes = _names(args.sizes, SIZES, "sizes")
    families = _names(args.families, FAMILIES, "families")
    seeds = _ints(args.seeds, "seeds")
    contexts = _ints(args.contexts, "contexts") if args.contexts else []
    out = pathlib.Path(args.out)
    for family, size in itertools.product(families, sizes):  # every config checked before anything trains
      validate_run_config(run_config(family, size, seeds[0], out, args))
    stores = {name: prepared_store(pathlib.Path(args.data), name) if args.data else
              prepare_corpus(name, out, load_config_file(str(CONFIG)).model.vocab_size,
                                   args.validation_fraction) for name in corpora}
    runs = list(itertools.product(corpora, sizes, seeds, families))  # a seed's families back to back
    for run in runs:
      refuse_other_settings(run_path(out, *run), settings)
  except ValueError as error:  # UserError and ConfigError included
    print(f"error: {error}", file=sys.stderr)
    return 2
  (out / "runs").mkdir(parents=True, exist_ok=True)
  for corpus, size, seed, family in runs:
    path = run_path(out, corpus, size, seed, family)
    if not path.exists():
      cfg = run_config(family, size, seed, stores[corpus], args)
      record = {"record": "run", "corpus": corpus, "size": size, "family": family, "seed": seed,
                "pattern": list(cfg.model.pattern), "settings": settings, **train_run(cfg)}
      storage.write_atomic(path, json.dumps(record).encode())
    print(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "curve"}), flush=True)
  decode_file = out / "decode.jsonl"
  if contexts and not decode_file.exists():
    records = decode_records(families, sizes, contexts, args.decode_repeats, args.seq_len)
    storage.write_atomic(decode_file, "".join(json.dumps(r) + "\n" for r in records).encode())
  print(f"report: {write_report(out)}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
