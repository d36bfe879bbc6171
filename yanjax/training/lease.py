"""One trainer per work directory: a lease file `<workdir>/lease.json` that process 0 takes at start.

The lease names its holder (host, pid, process start time, start and heartbeat times). A second trainer
finds it and refuses, saying who holds it. A lease left by a killed run is stale and taken over: on the same
host when its process is gone (pid not running, or running but started at another time: a reused pid);
from another host when its heartbeat is older than `STALE_AFTER_S`. The holder renews the heartbeat while it
trains (`renew`) and deletes the lease at exit.

Taking a lease is atomic on local disk (O_CREAT | O_EXCL on a temporary name, then a rename that fails
if another trainer won). Object stores have no such create here; there the lease is written, read back
after a moment, and kept only if it is still ours: two trainers starting within that moment can still
both start, which is the residual risk on buckets.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from yanjax.core import storage
from yanjax.core.config import ConfigError

LEASE_FILE = "lease.json"
STALE_AFTER_S = float(os.environ.get("YANJAX_LEASE_STALE_S", "300"))
RENEW_EVERY_S = 60.0
_SETTLE_S = 2.0  # object stores: wait this long before reading a written lease back


def _process_start(pid: int) -> str | None:
  """The start time of process `pid` as the kernel gives it (Linux), or None when unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


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
    started = _process_start(pid)
    return started is None or started == holder.get("process_start")
  return time.time() - float(holder.get("heartbeat", 0)) < STALE_AFTER_S


class Lease:
  """The lease of one work directory, held by this process (call `release` at exit)."""

  def __init__(self, workdir):
    self.workdir = storage.as_path(workdir)
    self.path = self.workdir / LEASE_FILE
    self.record = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                   "started": time.time(), "heartbeat": time.time(), "workdir": os.fspath(self.workdir)}
    self.last_renew = time.monotonic()

  def acquire(self) -> str | None:
    """Takes the lease; returns a note when a stale one was taken over; ConfigError when it is held."""
    note = None
    holder = self._read()
    if holder is not None:
      if _alive(holder):
        raise ConfigError(self._held_message(holder))
      note = (f"took over the stale lease of {self.workdir} (host {holder.get('host')}, pid {holder.get('pid')}, "
              f"last heartbeat {time.ctime(float(holder.get('heartbeat', 0)))})")
      self.path.unlink()
    if storage.is_remote(self.path):
      self._write()
      time.sleep(_SETTLE_S)
      holder = self._read()
      if holder is None or (holder.get("host"), holder.get("pid"), holder.get("started")) != (
          self.record["host"], self.record["pid"], self.record["started"]):
        raise ConfigError(self._held_message(holder or {}))
    else:
      self._create_local()
    return note

  def renew(self):
    """Refreshes the heartbeat (at most every RENEW_EVERY_S; cheap to call every step)."""
    if time.monotonic() - self.last_renew >= RENEW_EVERY_S:
      self.record["heartbeat"] = time.time()
      self._write()
      self.last_renew = time.monotonic()

  def release(self):
    """Deletes the lease if it is still ours."""
    holder = self._read()
    if holder is not None and holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]:
      self.path.unlink()

  def _read(self) -> dict[str, Any] | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except ValueError:
      return {}  # a torn lease: no heartbeat, so stale

  def _write(self):
    self.path.write_text(json.dumps(self.record))

  def _create_local(self):
    temp = self.workdir / f".{LEASE_FILE}.{os.getpid()}"
    temp.write_text(json.dumps(self.record))
    try:
      os.link(temp, self.path)  # fails if another trainer created the lease since we looked
    except FileExistsError:
      raise ConfigError(self._held_message(self._read() or {})) from None
    finally:
      temp.unlink()

  def _held_message(self, holder: dict[str, Any]) -> str:
    return (f"{self.workdir} is in use by another trainer (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"started {time.ctime(float(holder.get('started', 0)))}); stop it or use another --workdir (a lease "
            f"whose holder died is taken over: at once on the same host, after {STALE_AFTER_S:.0f} s elsewhere)")
