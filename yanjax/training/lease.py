"""One trainer per work directory: a lease file `<workdir>/lease.json` that process 0 takes at start.

The lease names its holder (host, pid, process start time, start and heartbeat times). A second trainer
finds it and refuses, saying who holds it. A lease left by a killed run is stale and taken over: on the same
host when its process is gone (pid not running, or running but started at another time: a reused pid);
from another host when its heartbeat is older than `STALE_AFTER_S`. The holder renews the heartbeat while it
trains (`renew`) and deletes the lease at exit.

Every change to the lease is a conditional write (yanjax/core/conditional.py): it is created only if absent,
and replaced (a stale takeover, a heartbeat) or deleted only if it is still the version read or last written.
On S3 and GCS the store checks the condition, so of two trainers starting on one workdir at the same instant
exactly one gets the lease, and a holder whose lease was taken over learns it at its next renewal (`LeaseLost`)
instead of overwriting the new holder's lease. On local disk creation is atomic (a hard link), while takeover,
renewal and release compare the file's content and then write: two trainers that both find the same stale lease
at the same instant can, in that window, both take it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from yanjax.core import conditional, storage
from yanjax.core.config import ConfigError
from yanjax.core.errors import UserError

LEASE_FILE = "lease.json"
STALE_AFTER_S = float(os.environ.get("YANJAX_LEASE_STALE_S", "300"))
RENEW_EVERY_S = 60.0
_ACQUIRE_TRIES = 5  # each lost race re-reads the lease; the winner's lease then refuses us


def _process_stat(pid: int) -> tuple[str, str] | None:
  """(state, start time) of process `pid` as the kernel gives them (Linux), or None when unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return fields[0], fields[19]
  except (OSError, IndexError):
    return None


def _process_start(pid: int) -> str | None:
  stat = _process_stat(pid)
  return stat and stat[1]


def _parse(current: tuple[bytes, str] | None) -> dict[str, Any] | None:
  """The holder record of a lease file as `conditional.read` returns it; {} (no heartbeat: stale) when torn."""
  if current is None:
    return None
  try:
    return json.loads(current[0])
  except ValueError:
    return {}


def _alive(holder: dict[str, Any]) -> bool:
  """Whether the holder of a lease still runs (see the module docstring)."""
  if holder.get("host") == socket.gethostname():
    pid = int(holder.get("pid", -1))
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return False
    except PermissionError:
      return True
    stat = _process_stat(pid)
    if stat is None:
      return True  # no /proc: the pid exists, which is all we know
    state, started = stat
    # A zombie is a dead trainer whose parent has not reaped it (a container's init may never do so).
    return state not in ("Z", "X") and started == holder.get("process_start")
  return time.time() - float(holder.get("heartbeat", 0)) < STALE_AFTER_S


class LeaseLost(UserError):
  """The lease this trainer held was taken over (or deleted) by someone else: two trainers would write."""


class Lease:
  """The lease of one work directory, held by this process (call `release` at exit)."""

  def __init__(self, workdir):
    self.workdir = storage.as_path(workdir)
    self.path = self.workdir / LEASE_FILE
    self.record = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                   "started": time.time(), "heartbeat": time.time(), "workdir": os.fspath(self.workdir)}
    self.token: str | None = None  # the version of the lease file this process wrote last (conditional.py)
    self.last_renew = time.monotonic()

  def acquire(self) -> str | None:
    """Takes the lease; returns a note when a stale one was taken over; ConfigError when it is held."""
    for _ in range(_ACQUIRE_TRIES):
      current = conditional.read(self.path)
      holder = _parse(current)
      if holder is not None and self._is_mine(holder):  # a retried write whose first try had landed
        self.token = current[1]
        return None
      if holder is not None and _alive(holder):
        raise ConfigError(self._held_message(holder))
      try:
        if current is None:
          self.token = conditional.create(self.path, self._data())
          return None
        self.token = conditional.replace(self.path, self._data(), current[1])
      except conditional.PreconditionFailed:
        continue  # another trainer wrote the lease since we read it: read again, see who holds it
      return (f"took over the stale lease of {self.workdir} (host {holder.get('host')}, pid {holder.get('pid')}, "
              f"last heartbeat {time.ctime(float(holder.get('heartbeat', 0)))})")
    raise ConfigError(self._held_message(_parse(conditional.read(self.path)) or {}))

  def renew(self):
    """Refreshes the heartbeat (at most every RENEW_EVERY_S; cheap to call every step); LeaseLost when another
    trainer took the lease over meanwhile."""
    if time.monotonic() - self.last_renew < RENEW_EVERY_S:
      return
    self.record["heartbeat"] = time.time()
    try:
      self.token = conditional.replace(self.path, self._data(), self.token)
    except conditional.PreconditionFailed:
      holder = _parse(conditional.read(self.path)) or {}
      self.token = None
      raise LeaseLost(f"{self.workdir}: this trainer lost its lease to another trainer (host {holder.get('host')}, "
                      f"pid {holder.get('pid')}), which took it over as stale; this one stops so that only one "
                      "writes. Find out why its heartbeat stalled (a paused or unreachable process) before "
                      "re-running") from None
    self.last_renew = time.monotonic()

  def release(self):
    """Deletes the lease if it is still the version this process wrote (best-effort: at exit; a store that stopped
    answering keeps it, and the next trainer on this host takes it over as stale)."""
    if self.token is None:
      return
    try:
      conditional.delete(self.path, self.token)
    except conditional.PreconditionFailed:
      pass  # taken over by another trainer: theirs now
    except Exception as error:  # pylint: disable=broad-except  # the run's own error was reported already
      if not storage.is_unreachable(error):
        raise
    self.token = None

  def _is_mine(self, holder: dict[str, Any]) -> bool:
    return all(holder.get(k) == self.record[k] for k in ("host", "pid", "started"))

  def _data(self) -> bytes:
    return json.dumps(self.record).encode()

  def _held_message(self, holder: dict[str, Any]) -> str:
    return (f"{self.workdir} is in use by another trainer (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"started {time.ctime(float(holder.get('started', 0)))}); stop it or use another --workdir (a lease "
            f"whose holder died is taken over: at once on the same host, after {STALE_AFTER_S:.0f} s elsewhere)")
