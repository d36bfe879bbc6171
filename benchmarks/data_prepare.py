"""Data preparation throughput (issue #17): `prepare_store` on 1 and 2 Ray workers against a single-process loop.

  python benchmarks/data_prepare.py                           # sentencepiece and byte-level BPE, 1 and 2 workers
  python benchmarks/data_prepare.py --tokenizers bpe --copies 2 --repeats 1

Corpus: the Python standard library's .py files (`sources.stdlib_files`), copied `--copies` times into a work
directory (no download), cut into about `--units` input shards. Tokenizers of `--vocab_size` pieces, trained
once on every third stdlib file (`--sample_bytes`) and passed as `tokenizer_model`, so no preparation trains:
a sentencepiece BPE model (`train_sentencepiece`) and a byte-level BPE tokenizer.json (`tokenizers`).

Each measurement runs in a fresh spawned process, so its imports, its Ray and its peak RSS (VmHWM) are its own:
  floor     one process reads the corpus as the pipeline does (`sources.read_documents`) and encodes it with
            `Tokenizer.encode_documents` in 1 MiB batches, on one core (sentencepiece with num_threads=1,
            `tokenizers`' encode_batch with RAYON_NUM_THREADS=1), counting tokens; nothing is written.
  floor_parallel  as many floors at once as the most workers, each on its share of the files, no Ray: this
            machine's own speed-up on that many processes, the ceiling the pipeline's speed-up is read against.
  startup   `import ray` and a local Ray's init and shutdown (`ray_runner.connect`), num_cpus = workers.
  pipeline  one `prepare_store` call into a new store (Ray started locally, num_cpus = workers), timed as
              wall    the whole call: what a user waits for (Ray and worker start-up and the publish included);
              steady  wall minus the median startup: Ray's own start-up left out;
              stage   first task start to last task end, from the unit records (end: the record's mtime, start:
                      end - its `seconds`): the running pipeline's rate, which is what scales to 100B tokens;
              task    the sum of the unit records' `seconds`: the rate inside the tasks, per core.
            Memory: the driver's VmHWM and the largest unit record's `peak_rss_bytes` (a Ray worker's
            ru_maxrss, Ray's own worker runtime included).

Goals (the issue's), judged on the best of `--repeats` for floor and pipeline alike: the floor's tokens/s over
the pipeline's per-core rate (stage tokens/s / workers) at most 1.5 at every worker count, and 2 workers'
stage tokens/s at least 1.7x 1 worker's. The same ratios on wall time are printed beside them. The projection
for 100B tokens at N workers is 1e11 / (per-core stage rate at the most workers measured x N): linear scaling at
this machine's per-core rate, with reads, writes and the driver not limiting and start-up left out.

JSON lines on stdout: one per measurement, one per (tokenizer, workers) over the repeats, one summary per
tokenizer. Meant for a quiet machine, without RAY_ADDRESS (it measures this machine).
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before `tokenizers` is imported: the floor is one core
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from yanjax.core.errors import UserError
from yanjax.data import documents, ray_runner, sources
from yanjax.data import tokenizer as tokenizers
from yanjax.data.prepare import PrepareSettings, prepare_store

TOKENIZER_KINDS = ("sentencepiece", "bpe")  # bpe: byte-level BPE tokenizer.json
BATCH_CHARS = 1 << 20  # text per encode call, as yanjax.data.prepare_tasks batches it
TARGET_TOKENS = 1e11
PROJECTED_WORKERS = (1, 2, 64, 512)
GOAL_FLOOR_OVER_PER_CORE, GOAL_SPEEDUP = 1.5, 1.7
MIB = 1 << 20
SPAWN_SECONDS = 5.0  # concurrent floors start this long after they are launched, once every process is up


def emit(record: dict[str, Any]):
  print(json.dumps({"bench": "data_prepare", **record}), flush=True)


def peak_rss_mib() -> float:
  """This process's peak resident set (VmHWM: since its exec, unlike ru_maxrss), MiB."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1024
  raise RuntimeError("/proc/self/status has no VmHWM")


def in_fresh_process(fn: Callable[..., dict[str, Any]], *args) -> dict[str, Any]:
  """fn(*args) in a new spawned process."""
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
    return pool.submit(fn, *args).result()


def make_corpus(directory: pathlib.Path, copies: int, max_files: int | None) -> list[sources.InputFile]:
  """The first `max_files` stdlib files copied `copies` times under `directory`; the stdlib files themselves."""
  root, files = sources.stdlib_root(), sources.stdlib_files()[:max_files]
  for copy in range(copies):
    for file in files:
      target = directory / f"copy{copy}" / pathlib.Path(file.url).relative_to(root)
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(file.url, target)
  return files


def make_tokenizers(files: list[sources.InputFile], kinds: list[str], vocab_size: int, sample_bytes: int,
                    directory: pathlib.Path) -> dict[str, str]:
  """Each kind's tokenizer file, trained on `sample_bytes` of every third file."""
  report = documents.ReadReport("fail")
  texts = (d.text for f in files[::3] for d in sources.read_documents(f, "text", "document", report))
  sample = tokenizers.sample_sentences(texts, sample_bytes)
  paths = {}
  for kind in kinds:
    if kind == "sentencepiece":
      path = directory / "tokenizer.model"
      data = tokenizers.train_sentencepiece(sample, vocab_size, "bpe", len(os.sched_getaffinity(0)))
    else:  # as GPT-2 / Llama-3 build theirs; <|endoftext|> is both bos and eos
      hf = Tokenizer(models.BPE())
      hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
      hf.decoder = decoders.ByteLevel()
      hf.train_from_iterator(sample, trainers.BpeTrainer(
          vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
      path, data = directory / "tokenizer.json", hf.to_str().encode("utf-8")
    path.write_bytes(data)
    paths[kind] = str(path)
  return paths


def floor(corpus: str, tokenizer_file: str, part: int = 0, parts: int = 1, start_at: float = 0.0) -> dict[str, Any]:
  """Reads and encodes every `parts`-th file of the corpus from `part` on one core, writing nothing; starts at
  `start_at` (epoch seconds), so that concurrent floors start together."""
  tokenizer = tokenizers.from_bytes(pathlib.Path(tokenizer_file).read_bytes(), tokenizer_file)
  files, report = sources.list_inputs([corpus])[part::parts], documents.ReadReport("fail")
  time.sleep(max(0.0, start_at - time.time()))
  start = time.time()
  tokens, batch, chars = 0, [], 0
  for file in files:
    for document in sources.read_documents(file, "text", "document", report):
      batch.append(document.text)
      chars += len(document.text)
      if chars >= BATCH_CHARS:
        tokens += sum(len(ids) for ids in tokenizer.encode_documents(batch))
        batch, chars = [], 0
  if batch:
    tokens += sum(len(ids) for ids in tokenizer.encode_documents(batch))
  end = time.time()
  return {"tokens": tokens, "seconds": round(end - start, 3), "peak_rss_mib": round(peak_rss_mib(), 1),
          "start": start, "end": end, "pid": os.getpid()}


def parallel_floors(corpus: str, tokenizer_file: str, parts: int) -> dict[str, Any]:
  """`parts` floors at once in their own processes, each on its share of the files, no Ray: the machine's own
  scaling. Seconds from the first start to the last end."""
  start_at = time.time() + SPAWN_SECONDS
  with concurrent.futures.ProcessPoolExecutor(parts, mp_context=multiprocessing.get_context("spawn")) as pool:
    results = list(pool.map(floor, *zip(*[(corpus, tokenizer_file, part, parts, start_at) for part in range(parts)])))
  if len({r["pid"] for r in results}) < parts or min(r["start"] for r in results) > start_at + 1:
    raise RuntimeError(f"the {parts} floors did not start together; raise SPAWN_SECONDS")
  return {"tokens": sum(r["tokens"] for r in results),
          "seconds": round(max(r["end"] for r in results) - min(r["start"] for r in results), 3),
          "peak_rss_mib": max(r["peak_rss_mib"] for r in results)}


def ray_startup(workers: int) -> dict[str, Any]:
  """Seconds of `import ray` and a local Ray's init and shutdown."""
  start = time.perf_counter()
  with ray_runner.connect(None, workers):
    pass
  return {"seconds": time.perf_counter() - start}


def pipeline(corpus: str, tokenizer_file: str, output: str, workers: int, shard_bytes: int) -> dict[str, Any]:
  """One `prepare_store` call; its wall, stage and task seconds, tokens and memory."""
  settings = PrepareSettings(output=output, inputs=(corpus,), tokenizer_model=tokenizer_file, num_workers=workers,
                             input_shard_bytes=shard_bytes, progress=False)
  start = time.perf_counter()
  with contextlib.redirect_stdout(sys.stderr):  # stdout carries only JSON lines
    prepare_store(settings)
  wall = time.perf_counter() - start
  store = pathlib.Path(output)
  metadata = json.loads((store / "metadata.json").read_text())
  records = [(json.loads(p.read_text()), p.stat().st_mtime) for p in (store / "units").glob("*.json")]
  return {
      "tokens": sum(split["num_tokens"] for split in metadata["splits"].values()),
      "units": len(records), "worker_processes": len({r["worker"] for r, _ in records}),
      "wall_s": round(wall, 3),
      "stage_s": round(max(end for _, end in records) - min(end - r["seconds"] for r, end in records), 3),
      "task_s": round(sum(r["seconds"] for r, _ in records), 3),
      "worker_peak_rss_mib": round(metadata["preparation"]["peak_rss_bytes_per_worker"] / MIB, 1),
      "driver_peak_rss_mib": round(peak_rss_mib(), 1),
  }


def aggregate(kind: str, workers: int, runs: list[dict[str, Any]], startup_s: float,
              floor_rate: float) -> dict[str, Any]:
  """The repeats of one (tokenizer, workers): best (least seconds) and median rates, per-core stage rate."""
  tokens = runs[0]["tokens"]
  seconds = {"wall": [r["wall_s"] for r in runs], "steady": [r["wall_s"] - startup_s for r in runs],
             "stage": [r["stage_s"] for r in runs]}
  rates = {}
  for name, values in seconds.items():
    rates[f"{name}_tokens_per_s"] = round(tokens / min(values))
    rates[f"{name}_tokens_per_s_median"] = round(tokens / statistics.median(values))
  per_core = rates["stage_tokens_per_s"] / workers
  return {"record": "aggregate", "tokenizer": kind, "mode": "pipeline", "workers": workers, "repeats": len(runs),
          "tokens": tokens, "startup_s_median": round(startup_s, 2), **rates,
          "task_tokens_per_s_per_core": round(tokens / min(r["task_s"] for r in runs)),
          "per_core_tokens_per_s": round(per_core), "floor_over_per_core": round(floor_rate / per_core, 3),
          "floor_over_per_core_wall": round(floor_rate * workers / rates["wall_tokens_per_s"], 3),
          "worker_peak_rss_mib": round(max(r["worker_peak_rss_mib"] for r in runs), 1),
          "driver_peak_rss_mib": round(max(r["driver_peak_rss_mib"] for r in runs), 1)}


def summary(kind: str, floors: list[dict[str, Any]], parallels: list[dict[str, Any]],
            rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
  """The goals' ratios and whether each is met, the floors' own speed-up, and the 100B-token projection."""
  floor_rate = max(f["tokens"] / f["seconds"] for f in floors)
  ratios = {w: row["floor_over_per_core"] for w, row in rows.items()}
  speedup = speedup_wall = None
  if 1 in rows and 2 in rows:
    speedup = round(rows[2]["stage_tokens_per_s"] / rows[1]["stage_tokens_per_s"], 3)
    speedup_wall = round(rows[2]["wall_tokens_per_s"] / rows[1]["wall_tokens_per_s"], 3)
  per_core = rows[max(rows)]["per_core_tokens_per_s"]
  return {
      "record": "summary", "tokenizer": kind,
      "floor_tokens_per_s": round(floor_rate),
      "floor_peak_rss_mib": round(max(f["peak_rss_mib"] for f in floors), 1),
      "tokens_match_floor": all(r["tokens"] == floors[0]["tokens"] for r in [*rows.values(), *parallels]),
      "floor_over_per_core": ratios, "floor_over_per_core_goal": GOAL_FLOOR_OVER_PER_CORE,
      "floor_over_per_core_met": all(r <= GOAL_FLOOR_OVER_PER_CORE for r in ratios.values()),
      "floor_over_per_core_wall": {w: row["floor_over_per_core_wall"] for w, row in rows.items()},
      "speedup_2_over_1": speedup, "speedup_goal": GOAL_SPEEDUP,
      "speedup_met": None if speedup is None else speedup >= GOAL_SPEEDUP, "speedup_2_over_1_wall": speedup_wall,
      "floor_parallel_processes": max(rows) if parallels else None,
      "floor_parallel_speedup": round(max(p["tokens"] / p["seconds"] for p in parallels) / floor_rate, 3)
                                if parallels else None,
      "projection_hours_for_100b_tokens": {n: round(TARGET_TOKENS / (per_core * n) / 3600, 2)
                                           for n in PROJECTED_WORKERS},
      "projection_basis": f"projection, not a measurement: {per_core:,} tokens/s per worker (stage rate at "
                          f"{max(rows)} workers here) x N workers, linear scaling, I/O and driver not limiting",
  }


def measure(kind: str, tokenizer_file: str, work: pathlib.Path, worker_counts: list[int], repeats: int,
            shard_bytes: int):
  """Floor, start-up and pipeline runs of one tokenizer, interleaved by repeat (a slow spell of the machine falls
  on every mode); their lines, aggregates and summary."""
  corpus = str(work / "corpus")
  parallel = max(worker_counts)
  floors, parallels = [], []
  startups, runs = {w: [] for w in worker_counts}, {w: [] for w in worker_counts}
  for repeat in range(repeats):
    single = in_fresh_process(floor, corpus, tokenizer_file)
    floors.append({k: single[k] for k in ("tokens", "seconds", "peak_rss_mib")})
    measured = [("floor", 1, floors[-1])]
    if parallel > 1:
      parallels.append(parallel_floors(corpus, tokenizer_file, parallel))
      measured.append(("floor_parallel", parallel, parallels[-1]))
    for mode, processes, record in measured:
      rate = record["tokens"] / record["seconds"]
      emit({"record": "run", "tokenizer": kind, "mode": mode, "workers": processes, "repeat": repeat, **record,
            "tokens_per_s": round(rate), "per_core_tokens_per_s": round(rate / processes)})
    for workers in worker_counts:
      startups[workers].append(in_fresh_process(ray_startup, workers)["seconds"])
      output = work / f"store-{kind}-{workers}-{repeat}"
      run = in_fresh_process(pipeline, corpus, tokenizer_file, str(output), workers, shard_bytes)
      shutil.rmtree(output)
      runs[workers].append(run)
      emit({"record": "run", "tokenizer": kind, "mode": "pipeline", "workers": workers, "repeat": repeat,
            "startup_s": round(startups[workers][-1], 2), **run, "tokens_per_s": round(run["tokens"] / run["wall_s"]),
            "stage_tokens_per_s": round(run["tokens"] / run["stage_s"]),
            "per_core_tokens_per_s": round(run["tokens"] / run["stage_s"] / workers)})
  floor_rate = max(f["tokens"] / f["seconds"] for f in floors)
  rows = {w: aggregate(kind, w, runs[w], statistics.median(startups[w]), floor_rate) for w in worker_counts}
  for row in rows.values():
    emit(row)
  emit(summary(kind, floors, parallels, rows))


def _positive_ints(text: str, what: str) -> list[int]:
  try:
    values = [int(value) for value in text.split(",")]
  except ValueError:
    values = []
  if not values or min(values) <= 0:
    raise UserError(f"--{what}={text!r}: give positive integers, comma-separated")
  return values


def _check(args: argparse.Namespace) -> tuple[list[str], list[int]]:
  kinds = [kind for kind in args.tokenizers.split(",") if kind]
  if not kinds or any(kind not in TOKENIZER_KINDS for kind in kinds):
    raise UserError(f"--tokenizers={args.tokenizers!r}: choose from {', '.join(TOKENIZER_KINDS)}, comma-separated")
  for name in ("repeats", "copies", "units", "vocab_size", "sample_bytes", "max_files"):
    value = getattr(args, name)
    if value is not None and value <= 0:
      raise UserError(f"--{name}={value} must be positive")
  if args.work_dir and not os.path.isdir(args.work_dir):
    raise UserError(f"--work_dir={args.work_dir}: not a directory")
  if os.environ.get("RAY_ADDRESS"):
    raise UserError("RAY_ADDRESS is set: this benchmark measures a Ray it starts on this machine; unset it")
  return kinds, sorted(set(_positive_ints(args.workers, "workers")))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokenizers", default=",".join(TOKENIZER_KINDS), help="sentencepiece,bpe")
  parser.add_argument("--workers", default="1,2", help="Ray worker counts, comma-separated")
  parser.add_argument("--repeats", type=int, default=2, help="runs of every measurement (best and median)")
  parser.add_argument("--copies", type=int, default=8, help="copies of the stdlib files in the corpus")
  parser.add_argument("--max_files", type=int, help="only the first N stdlib files (default: all)")
  parser.add_argument("--units", type=int, default=16, help="about this many input shards")
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--sample_bytes", type=int, default=4_000_000, help="tokenizer training text")
  parser.add_argument("--work_dir", help="parent of the temporary work directory (default: the system's)")
  args = parser.parse_args(argv)
  try:
    kinds, worker_counts = _check(args)
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2

  with tempfile.TemporaryDirectory(prefix="data_prepare-", dir=args.work_dir) as work:
    work = pathlib.Path(work)
    files = make_corpus(work / "corpus", args.copies, args.max_files)
    tokenizer_files = make_tokenizers(files, kinds, args.vocab_size, args.sample_bytes, work)
    corpus_bytes = sum(f.size for f in files) * args.copies
    shard_bytes = math.ceil(corpus_bytes / args.units)
    emit({"record": "setup", "corpus": f"python stdlib .py files x {args.copies}", "files": len(files) * args.copies,
          "bytes": corpus_bytes, "input_shard_bytes": shard_bytes, "vocab_size": args.vocab_size,
          "cpus": len(os.sched_getaffinity(0)), "floor_threads": 1,
          "floor_settings": "RAYON_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false, sentencepiece num_threads=1"})
    for kind in kinds:
      measure(kind, tokenizer_files[kind], work, worker_counts, args.repeats, shard_bytes)
  return 0


if __name__ == "__main__":
  sys.exit(main())
