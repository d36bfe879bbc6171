"""Faults during a preparation: a Ray worker killed mid-task, an input whose workers are killed every time, the
driver killed mid-run. The store is never trusted before it is complete, and what is finally published equals an
uninterrupted preparation.

Each interrupted run is a `python -m data_pipelines.prepare` process with its own local Ray (no RAY_ADDRESS),
so the processes killed here are its own, never the session cluster's that other tests use.
"""

import concurrent.futures
import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from data_pipelines.prepare import parse_settings
from yanjax.data import sources
from yanjax.data.errors import StoreError
from yanjax.data.prepare import prepare_store
from yanjax.data.store import TEMP_MARKER, UNITS_DIR, open_store

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, small_store) -> tuple[list[str], pathlib.Path]:
  """(the preparation's arguments but --output, the reference store prepared without interruption)."""
  files = [f.url for f in sources.stdlib_files()][:300]
  argv = ["--tokenizer_model", str(small_store / "tokenizer.model"), "--input_shard_bytes", "100000",
          "--num_workers", "1", "--no_progress", *files]
  reference = tmp_path_factory.mktemp("reference") / "store"
  prepare_store(parse_settings(["--output", str(reference), *argv]))
  return argv, reference


def start_preparation(output: pathlib.Path, argv: list[str]) -> subprocess.Popen:
  """The preparation as its own process group, with a Ray of its own."""
  env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
  return subprocess.Popen([sys.executable, "-m", "data_pipelines.prepare", "--output", str(output), *argv],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)


def wait_for_units(output: pathlib.Path, count: int, proc: subprocess.Popen) -> int:
  """Waits until the run has finished `count` units; returns how many it has."""
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline:
    done = len(list(output.parent.glob(f"{output.name}{TEMP_MARKER}*/{UNITS_DIR}/*.json")))
    if done >= count:
      return done
    assert proc.poll() is None, f"the preparation ended early: {proc.communicate()}"
    time.sleep(0.05)
  raise AssertionError(f"fewer than {count} units finished in time")


def descendants(pid: int) -> list[int]:
  """Every process below `pid`."""
  children: dict[int, list[int]] = {}
  for entry in pathlib.Path("/proc").iterdir():
    if not entry.name.isdigit():
      continue
    try:
      parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (ValueError, OSError, IndexError):
      continue
    children.setdefault(parent, []).append(int(entry.name))
  found, stack = [], [pid]
  while stack:
    for child in children.get(stack.pop(), []):
      found.append(child)
      stack.append(child)
  return found


def running_tasks(proc: subprocess.Popen) -> list[int]:
  """The worker processes running a Ray Data task under `proc`, as soon as there is one (between two tasks a
  worker is idle)."""
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    tasks = [pid for pid in descendants(proc.pid) if command_line(pid).startswith("ray::Map")]
    if tasks:
      return tasks
    assert proc.poll() is None, f"the preparation ended before a task was seen running: {proc.communicate()}"
    time.sleep(0.005)
  raise AssertionError("no Ray task was seen running")


def command_line(pid: int) -> str:
  try:
    return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
  except OSError:
    return ""


def assert_same_store(path: pathlib.Path, reference: pathlib.Path):
  store, expected = open_store(path), open_store(reference)
  for split in ("train", "validation"):
    np.testing.assert_array_equal(store.split(split).tokens.read().result(),
                                  expected.split(split).tokens.read().result())
    np.testing.assert_array_equal(store.split(split).doc_offsets, expected.split(split).doc_offsets)
  assert store.metadata["fingerprint"] == expected.metadata["fingerprint"]


def test_a_worker_killed_mid_task_is_retried_and_the_store_is_whole(tmp_path, corpus):
  argv, reference = corpus
  output = tmp_path / "store"
  proc = start_preparation(output, argv)
  wait_for_units(output, 2, proc)
  for pid in running_tasks(proc):
    with contextlib.suppress(ProcessLookupError):  # it finished its task since
      os.kill(pid, signal.SIGKILL)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  assert_same_store(output, reference)
  assert not list(tmp_path.glob(f"store{TEMP_MARKER}*"))


def test_a_killed_driver_leaves_no_trusted_store_and_a_rerun_keeps_the_verified_shards(tmp_path, corpus, capsys):
  argv, reference = corpus
  output = tmp_path / "store"
  proc = start_preparation(output, argv)
  finished = wait_for_units(output, 3, proc)
  for pid in [proc.pid, *descendants(proc.pid)]:  # the driver and the Ray it started, at once
    with contextlib.suppress(ProcessLookupError):  # a short-lived helper process may have ended since
      os.kill(pid, signal.SIGKILL)
  proc.wait()
  with pytest.raises(StoreError):
    open_store(output)
  (temp,) = tmp_path.glob(f"store{TEMP_MARKER}*")
  with pytest.raises(StoreError):
    open_store(temp)
  records = sorted((temp / UNITS_DIR).glob("*.json"))
  assert len(records) >= finished
  damaged = json.loads(records[0].read_text())["unit"]
  zarr_shard = next(p for p in (temp / "train" / f"{damaged:06d}" / "tokens").rglob("*") if p.name == "0")
  data = bytearray(zarr_shard.read_bytes())
  data[len(data) // 2] ^= 0xFF
  zarr_shard.write_bytes(bytes(data))
  capsys.readouterr()
  prepare_store(parse_settings(["--output", str(output), *argv]))  # on the session's Ray cluster
  assert "resuming the interrupted preparation" in capsys.readouterr().err
  assert_same_store(output, reference)
  resumed = open_store(output).metadata["preparation"]["units_resumed"]
  assert resumed == len(records) - 1  # every verified unit kept, the damaged one written again


def kill_readers_of(path: pathlib.Path, proc: subprocess.Popen, stop) -> int:
  """Kills, as the kernel's OOM killer would, every process under `proc` that has `path` open, until `stop` is
  set or `proc` ends; returns how many it killed."""
  killed: set[int] = set()  # a killed worker holds the file open until it has exited: counted once
  while not stop.is_set() and proc.poll() is None:
    for pid in set(descendants(proc.pid)) - killed:
      try:
        opened = any(os.readlink(fd) == str(path) for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir())
      except OSError:  # it ended, or closed the file, while looked at
        continue
      if opened:
        try:
          os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended since
          continue
        killed.add(pid)
    time.sleep(0.002)
  return len(killed)


def test_an_input_that_kills_its_worker_every_time_fails_the_run_naming_it(tmp_path, corpus):
  argv, _ = corpus
  poison = tmp_path / "huge.jsonl"  # a unit of its own, open while it is tokenized (a few seconds)
  poison.write_text("".join(json.dumps({"text": f"line {i} " * 50}) + "\n" for i in range(3000)))
  output = tmp_path / "store"
  run_argv = ["--max_unit_tries", "2", *argv, str(poison)]
  proc = start_preparation(output, run_argv)
  stop = threading.Event()
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    killer = pool.submit(kill_readers_of, poison, proc, stop)
    start = time.monotonic()
    _, err = proc.communicate(timeout=300)
    stop.set()
  assert proc.returncode == 2, err
  assert killer.result() == 2, err
  assert time.monotonic() - start < 300
  lines = [line for line in err.splitlines() if line.strip()]
  assert lines[-1].startswith("error: input shard ") and "killed its Ray worker 2 times" in lines[-1]
  assert f"{poison})" in lines[-1]  # the last file of its unit
  assert "Traceback" not in err
  (temp,) = tmp_path.glob(f"store{TEMP_MARKER}*")
  assert str(temp) in lines[-1]
  kept = len(list((temp / UNITS_DIR).glob("*.json")))
  assert kept >= 1
  proc = start_preparation(output, run_argv)  # the same command, nothing killing it now: resumes
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  assert open_store(output).metadata["preparation"]["units_resumed"] >= kept
