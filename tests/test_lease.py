"""The workdir lease (yanjax/training/lease.py) on local disk and on a real S3 server (moto, on 127.0.0.1):
of two trainers that start at the same instant exactly one wins; a stale lease is taken over; a holder whose
lease was taken over learns it at its next renewal; release deletes only a lease that is still ours."""

import json
import math
import multiprocessing
import os
import socket
import subprocess
import time

import pytest

from yanjax.core import conditional, storage
from yanjax.core.config import ConfigError
from yanjax.training import lease as lease_module
from yanjax.training.lease import Lease, LeaseLost

ROUNDS = 5


def _contender(workdir: str, start, done, results):
  """Acquires the lease of `workdir` when both contenders reach `start` (a barrier); reports "won" or the
  refusal; holds the lease until `done` is set."""
  lease = Lease(workdir)
  start.wait()
  try:
    lease.acquire()
    results.put("won")
  except ConfigError as error:
    results.put(str(error))
  done.wait()
  lease.release()


def _race(workdir: str) -> list[str]:
  """Two processes (spawned: this process has JAX loaded) acquire the lease at the same instant."""
  context = multiprocessing.get_context("spawn")
  start, done, results = context.Barrier(2), context.Event(), context.Queue()
  contenders = [context.Process(target=_contender, args=(workdir, start, done, results)) for _ in range(2)]
  for process in contenders:
    process.start()
  outcomes = [results.get(timeout=120) for _ in contenders]
  done.set()
  for process in contenders:
    process.join(timeout=60)
    assert process.exitcode == 0
  return outcomes


@pytest.fixture(params=["local", "s3"])
def workdir(request, tmp_path) -> str:
  if request.param == "local":
    return str(tmp_path / "run")
  return request.getfixturevalue("s3_bucket") + "/run"


def test_two_trainers_starting_together_one_wins(workdir):
  if not storage.is_remote(workdir):
    os.makedirs(workdir)
  for _ in range(ROUNDS):
    outcomes = _race(workdir)
    assert sorted(outcomes)[-1] == "won" and "is in use by another trainer" in sorted(outcomes)[0], outcomes
    assert conditional.read(storage.as_path(workdir) / "lease.json") is None  # the winner released it


def test_a_stale_lease_is_taken_over(workdir):
  path = storage.as_path(workdir) / "lease.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"host": os.uname().nodename, "pid": 2 ** 22 - 3, "started": 0, "heartbeat": 0}))
  lease = Lease(workdir)
  assert "took over the stale lease" in lease.acquire()
  lease.release()
  assert not path.exists()


def test_a_holder_whose_lease_was_taken_over_learns_it(workdir):
  if not storage.is_remote(workdir):
    os.makedirs(workdir)
  first = Lease(workdir)
  first.record.update(host="another-host", heartbeat=0)  # its heartbeat stalled long ago: stale
  first.acquire()
  second = Lease(workdir)
  assert "took over the stale lease" in second.acquire()
  first.last_renew = -math.inf
  with pytest.raises(LeaseLost, match="lost its lease to another trainer"):
    first.renew()
  first.release()  # not ours any more: the new holder's lease stays
  assert json.loads(conditional.read(second.path)[0])["pid"] == os.getpid()
  second.release()
  assert conditional.read(second.path) is None


def test_a_lease_whose_holder_is_a_zombie_is_stale(tmp_path):
  """A killed trainer that its parent has not reaped (a container whose init never reaps) holds nothing."""
  dead, alive = subprocess.Popen(["true"]), subprocess.Popen(["sleep", "60"])
  try:
    while lease_module._process_stat(dead.pid)[0] != "Z":  # exited, not yet waited for  # pylint: disable=protected-access
      time.sleep(0.01)
    for process, expected in ((dead, False), (alive, True)):
      holder = {"host": socket.gethostname(), "pid": process.pid,
                "process_start": lease_module._process_start(process.pid)}  # pylint: disable=protected-access
      assert lease_module._alive(holder) is expected  # pylint: disable=protected-access
  finally:
    alive.kill()
    for process in (dead, alive):
      process.wait()
