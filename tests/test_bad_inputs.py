"""Bad inputs, faults and interruptions, one row each: the command, the exit code, a fragment of its message, and
what must still be intact afterwards. The row count is reported in docs/training.md ("Errors").

Each row runs real commands in subprocesses on a copy of one small trained run (checkpoints at steps 4 and 8).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from typing import Callable

import pytest
import s3_server
from test_train import REPO, losses, tiny_flags

PREEMPTED, USAGE = 42, 2


@dataclasses.dataclass
class Row:
  """One case: `run(ctx)` -> (exit code, stdout + stderr); `intact(ctx)` asserts what must survive."""
  name: str
  run: Callable[[dict], tuple[int, str]]
  code: int
  fragment: str
  intact: Callable[[dict], None] = lambda ctx: None


def _command(module: str, *args, env=None, timeout=240) -> tuple[int, str]:
  proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, check=False, env={**os.environ, **(env or {})})
  return proc.returncode, proc.stdout + proc.stderr


def _train(ctx, *extra, steps=8):
  return _command("yanjax.main.train", f"--workdir={ctx['workdir']}", *tiny_flags(ctx["store"], steps=steps),
                  "--config.checkpoint.every_steps=4", *extra)


def _snapshot(directory) -> dict[str, bytes]:
  return {os.path.relpath(p, directory): open(p, "rb").read()
          for p in glob.glob(f"{directory}/**/*", recursive=True) if os.path.isfile(p)}


def _checkpoints_intact(ctx):
  assert _snapshot(ctx["workdir"] / "checkpoints") == ctx["checkpoints"]


def _prepare_into_input(ctx):
  victim = ctx["tmp"] / "corpus"
  victim.mkdir()
  (victim / "notes.txt").write_text("my notes")
  (victim / "module.py").write_text("x = 1\n" * 200)
  ctx["victim"] = _snapshot(victim)
  return _command("data_pipelines.prepare", "--output", victim, "--overwrite", "--vocab_size", "300", victim)


def _prepare_over_user_files(ctx):
  target = ctx["tmp"] / "downloads"
  (target / "other_store").mkdir(parents=True)
  (target / "other_store" / "file.bin").write_bytes(b"123")
  ctx["victim"] = _snapshot(target)
  ctx["victim_dir"] = target
  return _command("data_pipelines.prepare", "--output", target, "--overwrite", *ctx["stdlib"])


def _second_trainer(ctx):
  first = subprocess.Popen([sys.executable, "-m", "yanjax.main.train", f"--workdir={ctx['workdir']}",
                            *tiny_flags(ctx["store"], steps=100000, eval_every=100000),
                            "--config.checkpoint.every_steps=100000"], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while not (ctx["workdir"] / "lease.json").exists() or json.loads(
        (ctx["workdir"] / "lease.json").read_text()).get("pid") != first.pid:
      assert first.poll() is None and time.time() < deadline
      time.sleep(0.1)
    return _train(ctx, steps=12)
  finally:
    first.kill()
    first.wait()


def _stale_lease(ctx):
  (ctx["workdir"] / "lease.json").write_text(json.dumps({"host": os.uname().nodename, "pid": 2 ** 22 - 3,
                                                         "started": 0, "heartbeat": 0}))
  return _train(ctx, steps=10)


def _damage_meta(how: str):
  def run(ctx):
    meta = ctx["workdir"] / "checkpoints/8/meta/metadata"
    if how == "missing":
      meta.unlink()
    else:
      meta.write_text(meta.read_text()[:20])
    return _train(ctx, steps=10)
  return run


def _truncate_state_metadata(ctx):
  metadata = ctx["workdir"] / "checkpoints/8/state/_METADATA"
  metadata.write_text(metadata.read_text()[:10])
  return _train(ctx, steps=10)


def _flip_state_bit(ctx):
  files = [p for p in glob.glob(f"{ctx['workdir']}/checkpoints/8/state/**/d/*", recursive=True)]
  largest = max(files, key=os.path.getsize)
  data = bytearray(open(largest, "rb").read())
  data[len(data) // 2] ^= 1
  open(largest, "wb").write(bytes(data))
  return _train(ctx, steps=10)


def _other_tokenizer_store(ctx):
  other = ctx["tmp"] / "other_store"
  code, out = _command("data_pipelines.prepare", "--output", other, "--vocab_size", "512", "--seed", "7",
                       "--validation_fraction", "0.3",
                       "--tokenizer_type", "unigram", *ctx["stdlib"])
  assert code == 0, out
  ctx["store"] = other
  return _train(ctx, steps=10)


def _sigterm_at_start_up(ctx):
  proc = subprocess.Popen([sys.executable, "-m", "yanjax.main.train", f"--workdir={ctx['tmp'] / 'fresh'}",
                           *tiny_flags(ctx["store"], steps=8)], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  time.sleep(1.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  return proc.returncode, out


def _kill_then_resume(ctx):
  proc = subprocess.Popen([sys.executable, "-m", "yanjax.main.train", f"--workdir={ctx['tmp'] / 'killed'}",
                           *tiny_flags(ctx["store"], steps=16), "--config.checkpoint.every_steps=4"], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not (ctx["tmp"] / "killed/checkpoints/8").exists():
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.02)
  time.sleep(0.5)  # a few more steps logged after the checkpoint, then lost
  proc.kill()
  proc.wait()
  ctx["workdir"] = ctx["tmp"] / "killed"
  return _train(ctx, steps=16)


def _record_intact(ctx):
  """The workdir's config.json is still the record of the run that wrote its checkpoints."""
  assert (ctx["workdir"] / "config.json").read_bytes() == ctx["record"]
  _checkpoints_intact(ctx)


@contextlib.contextmanager
def _small_disk(path, free_bytes: int, fill_from=None):
  """A tmpfs at `path` holding a copy of `fill_from` (if given) and then `free_bytes` free; unmounted after."""
  path.mkdir(parents=True)
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], check=True)
  try:
    if fill_from is not None:
      shutil.copytree(fill_from, path / fill_from.name)
    fs = os.statvfs(path)
    used = (fs.f_blocks - fs.f_bfree) * fs.f_frsize
    subprocess.run(["mount", "-o", f"remount,size={used + free_bytes}", str(path)], check=True)
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=True)


def _train_on_a_full_disk(ctx):
  """Resumes to step 16 on a disk with room for metrics but not for the checkpoint at step 12; what is on the
  disk afterwards is copied out (as ctx["workdir"]) before it is unmounted."""
  with _small_disk(ctx["tmp"] / "disk", 256 << 10, fill_from=ctx["workdir"]) as disk:
    ctx["workdir"] = disk / "run"
    result = _train(ctx, steps=16)
    ctx["workdir"] = shutil.copytree(disk / "run", ctx["tmp"] / "after")
  return result


def _prepare_on_a_full_disk(ctx):
  """Prepares 20 files into a disk that holds a few of their units and a file of the user's; records what the
  failed run kept before the disk is unmounted."""
  with _small_disk(ctx["tmp"] / "disk", 300 << 10) as disk:
    (disk / "notes.txt").write_text("my notes")
    result = _command("data_pipelines.prepare", "--output", disk / "store", "--tokenizer_model",
                      ctx["workdir"] / "tokenizer.model", "--input_shard_bytes", "50000", "--num_workers", "1",
                      "--no_progress", *ctx["stdlib"], env={"RAY_ADDRESS": ""})
    ctx["kept_units"] = glob.glob(f"{disk}/store.tmp-*/units/*.json")
    ctx["notes"] = (disk / "notes.txt").read_text()
  return result


def _units_and_notes_kept(ctx):
  assert ctx["kept_units"] and ctx["notes"] == "my notes"


def _each_step_once(ctx):
  records = [json.loads(line) for line in (ctx["workdir"] / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == sorted(set(steps)) and sorted(losses(ctx["workdir"])) == list(range(1, 17)), steps


def _victim_intact(ctx):
  directory = ctx.get("victim_dir", ctx["tmp"] / "corpus")
  assert _snapshot(directory) == ctx["victim"]


def _tokenizer_matches_checkpoints(ctx):
  assert (ctx["workdir"] / "tokenizer.model").read_bytes() == ctx["tokenizer"]


def _generate(ctx, *flags):
  return _command("yanjax.main.generate", f"--workdir={ctx['workdir']}", *flags)


def _attention_prompt_past_its_cache(ctx):
  """An attention run (4 steps, 32 KV-cache slots) asked for more tokens than its cache holds."""
  run = ctx["tmp"] / "attention"
  code, out = _command("yanjax.main.train", f"--workdir={run}", *tiny_flags(ctx["store"], steps=4),
                       "--config.model.pattern=('attention',)", "--config.model.max_decode_len=32")
  assert code == 0, out[-3000:]
  return _command("yanjax.main.generate", f"--workdir={run}", "--prompt_ids=1,2,3", "--max_new_tokens=40")


def _sweep_run(ctx, spec, *flags):
  return _command("yanjax.main.sweep", "run", f"--spec={spec}", f"--out={ctx['tmp'] / 'sweep'}", *flags)


def _sweep_spec_with_a_syntax_error(ctx):
  spec = ctx["tmp"] / "spec.py"
  spec.write_text("def get_sweep():\n  return dict(tokens=[1,)\n")
  return _sweep_run(ctx, spec)


def _store_dies_mid_run(ctx):
  """Trains on a bucket of a moto server of its own and kills that server once checkpoint 4 is committed; the
  trainer must then exit by itself (bounded: no thread left waiting on the dead store)."""
  import boto3  # pylint: disable=import-outside-toplevel
  with s3_server.moto_process() as (endpoint, moto):
    workdir = s3_server.create_bucket(endpoint, "outage") + "/run"
    env = {**os.environ, **s3_server.s3_environment(endpoint), "YANJAX_STORAGE_TIMEOUT_S": "5"}
    log = ctx["tmp"] / "trainer.log"
    with open(log, "w", encoding="utf-8") as out:
      trainer = subprocess.Popen([sys.executable, "-m", "yanjax.main.train", f"--workdir={workdir}",
                                  *tiny_flags(ctx["store"], steps=100000, eval_every=100000)], cwd=REPO, env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    deadline = time.time() + 120
    while not s3.list_objects_v2(Bucket="outage", Prefix="run/checkpoints/4/commit_success.txt").get("KeyCount"):
      assert trainer.poll() is None and time.time() < deadline, log.read_text()[-3000:]
      time.sleep(0.2)
    moto.kill()
    moto.wait()
    try:
      trainer.wait(timeout=180)
    finally:
      trainer.kill()
    ctx["endpoint"], ctx["out"] = endpoint, log.read_text()
    return trainer.returncode, ctx["out"]


def _names_endpoint_and_a_committed_step(ctx):
  line = [line for line in ctx["out"].splitlines() if line.strip()][-1]
  assert ctx["endpoint"] in line and ctx["out"].count("error: ") == 1, line
  step = int(line.split("the last checkpoint that is safe is step ")[1].split(",")[0])
  assert step >= 4 and step % 4 == 0, line  # 4 was seen committed; a later one only if its save completed


ROWS = [
    Row("prepare --overwrite onto its own input directory", _prepare_into_input, USAGE,
        "contains the input", _victim_intact),
    Row("prepare --overwrite onto a directory of other files", _prepare_over_user_files, USAGE,
        "is never replaced", _victim_intact),
    Row("a second trainer on a workdir in use", _second_trainer, USAGE, "is in use by another trainer",
        _checkpoints_intact),
    Row("a lease left by a killed trainer is taken over", _stale_lease, 0, "took over the stale lease"),
    Row("resume with another seed", lambda ctx: _train(ctx, "--config.train.seed=5", steps=10), USAGE,
        "seed: 0 -> 5", _checkpoints_intact),
    Row("resume with another global batch", lambda ctx: _train(ctx, "--config.train.global_batch=4", steps=10),
        USAGE, "global_batch: 8 -> 4", _checkpoints_intact),
    Row("resume with another number of layers", lambda ctx: _train(ctx, "--config.model.layers=3", steps=10), USAGE,
        "parameter shapes differ", _record_intact),
    Row("resume on a store with another tokenizer of the same size", _other_tokenizer_store, USAGE,
        "tokenizer_sha256", lambda ctx: (_checkpoints_intact(ctx), _tokenizer_matches_checkpoints(ctx))),
    Row("resume with another seed, overridden on purpose",
        lambda ctx: _train(ctx, "--config.train.seed=5", "--allow_data_change", steps=10), 0,
        "resuming on changed data (--allow_data_change): seed: 0 -> 5"),
    Row("latest checkpoint's metadata missing", _damage_meta("missing"), 0, "resumed from the checkpoint at step 4"),
    Row("latest checkpoint's metadata truncated", _damage_meta("truncated"), 0,
        "resumed from the checkpoint at step 4"),
    Row("latest checkpoint's state metadata truncated", _truncate_state_metadata, 0,
        "resumed from the checkpoint at step 4"),
    Row("one flipped bit in the latest checkpoint's data", _flip_state_bit, 0, "checksums differ"),
    Row("a mistyped data store next to prepare_default",
        lambda ctx: _train(ctx, "--config.data.stores=('/nonexistent/stdlib',)", "--config.data.prepare_default=True"),
        USAGE, "no prepared store at /nonexistent/stdlib"),
    Row("eval_batches=0 while evaluating", lambda ctx: _train(ctx, "--config.train.eval_batches=0"), USAGE,
        "train.eval_batches=0: must be >= 1"),
    Row("b1=1.5", lambda ctx: _train(ctx, "--config.optimizer.b1=1.5"), USAGE, "optimizer.b1=1.5: must be in [0, 1)"),
    Row("clip_norm=-1", lambda ctx: _train(ctx, "--config.optimizer.clip_norm=-1"), USAGE,
        "optimizer.clip_norm=-1.0: must be > 0"),
    Row("min_lr_ratio=5", lambda ctx: _train(ctx, "--config.optimizer.min_lr_ratio=5"), USAGE,
        "optimizer.min_lr_ratio=5.0: must be in [0, 1]"),
    Row("SIGTERM during start-up", _sigterm_at_start_up, PREEMPTED, "nothing to save yet"),
    Row("SIGKILL after a checkpoint, then resume: each step logged once", _kill_then_resume, 0,
        "resumed from the checkpoint at step", _each_step_once),
    Row("a workdir URL with a typo'd scheme", lambda ctx: _command("yanjax.main.train", "--workdir=gcs://b/run",
                                                                   *tiny_flags(ctx["store"])), USAGE,
        "unknown storage scheme gcs://"),
    Row("generate from a workdir without checkpoints",
        lambda ctx: _command("yanjax.main.generate", f"--workdir={ctx['tmp'] / 'empty'}", "--prompt=a"), USAGE,
        "no checkpoint under"),
    Row("the NumPy runtime on a missing export",
        lambda ctx: _command("yanjax.numpy_runtime", f"--export={ctx['tmp'] / 'none'}", "--prompt=a"), USAGE,
        "export directory missing"),
    # Disk full and dying workers (issue 23)
    Row("disk full while a checkpoint is written", _train_on_a_full_disk, USAGE,
        "no space left on device writing the checkpoint at step 12", _checkpoints_intact),
    Row("disk full while data is prepared", _prepare_on_a_full_disk, USAGE, "no space left on device under",
        _units_and_notes_kept),
    # CLI flags and config errors (issue 23)
    Row("generate --max_new_tokens 0", lambda ctx: _generate(ctx, "--prompt=a", "--max_new_tokens=0"), USAGE,
        "--max_new_tokens=0: must be >= 1"),
    Row("generate --temperature nan", lambda ctx: _generate(ctx, "--prompt=a", "--temperature=nan"), USAGE,
        "--temperature=nan: must be a number >= 0"),
    Row("generate --top_p 1.5", lambda ctx: _generate(ctx, "--prompt=a", "--top_p=1.5"), USAGE,
        "--top_p=1.5: must be in (0, 1]"),
    Row("generate --prompt_ids 1,abc", lambda ctx: _generate(ctx, "--prompt_ids=1,abc"), USAGE,
        "'abc' is not a token id"),
    Row("generate past an attention run's KV cache", _attention_prompt_past_its_cache, USAGE,
        "needs 42 KV-cache slots but this model (pattern ('attention',)) has model.max_decode_len=32"),
    Row("the NumPy runtime with --max_new_tokens -3",
        lambda ctx: _command("yanjax.numpy_runtime", f"--export={ctx['tmp']}", "--prompt=a", "--max_new_tokens=-3"),
        USAGE, "--max_new_tokens=-3: must be >= 1"),
    Row("sweep spec with a syntax error", _sweep_spec_with_a_syntax_error, USAGE, "spec.py:2: Python syntax error"),
    Row("sweep run --only 99 on a grid of 12", lambda ctx: _sweep_run(ctx, "configs/sweeps/tiny.py", "--only=99"),
        USAGE, "has 12 points; give an index in [0, 11]"),
    Row("plan of 2000 layers answers in seconds",
        lambda ctx: _command("yanjax.main.plan", "--config=configs/yan_tiny.py", "--devices=1",
                             "--config.model.layers=2000", timeout=60), 0, "total (state + max of phases)"),
    Row("plan --devices -8", lambda ctx: _command("yanjax.main.plan", "--config=configs/yan_tiny.py", "--devices=-8"),
        USAGE, "--devices=-8: must be >= 1"),
    Row("plan --mfu 5", lambda ctx: _command("yanjax.main.plan", "--config=configs/yan_tiny.py", "--mfu=5"), USAGE,
        "--mfu=5.0: must be in (0, 1]"),
    Row("plan with a missing config file",
        lambda ctx: _command("yanjax.main.plan", f"--config={ctx['tmp'] / 'none.py'}"), USAGE, "does not exist"),
    Row("summary of an unknown variant",
        lambda ctx: _command("yanjax.main.summary", "--config=configs/yan_tiny.py:nope"), USAGE,
        "unknown config variant 'nope'; choose one of"),
    # Buckets (issue 23)
    Row("the S3 endpoint dies mid-training", _store_dies_mid_run, USAGE,
        "the storage service became unreachable during training", _names_endpoint_and_a_committed_step),
]


@pytest.fixture(scope="module")
def trained(small_store, tmp_path_factory):
  """A workdir trained 8 steps (checkpoints 4 and 8) on the small store, and 20 standard-library files."""
  workdir = tmp_path_factory.mktemp("bad_inputs") / "run"
  code, out = _command("yanjax.main.train", f"--workdir={workdir}", *tiny_flags(small_store, steps=8),
                       "--config.checkpoint.every_steps=4")
  assert code == 0, out[-3000:]
  stdlib = sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/*.py"))[:20]
  return workdir, small_store, stdlib


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(row, trained, tmp_path):
  source, store, stdlib = trained
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  ctx = {"workdir": workdir, "store": store, "stdlib": stdlib, "tmp": tmp_path,
         "checkpoints": _snapshot(workdir / "checkpoints"), "tokenizer": (workdir / "tokenizer.model").read_bytes(),
         "record": (workdir / "config.json").read_bytes()}
  code, out = row.run(ctx)
  print(out[-3000:])
  assert code == row.code, out[-3000:]
  assert row.fragment in out
  if code == USAGE:
    assert "Traceback" not in out
    assert [line for line in out.splitlines() if line.strip()][-1].startswith("error: ")
  row.intact(ctx)
