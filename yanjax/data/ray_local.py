"""A Ray head on this machine for the length of a block, started as its own program, never forked.

`ray.init()` without an address starts Ray's processes with a `preexec_fn`, which makes CPython run its
at-fork handlers in this process; when this process runs JAX (the trainer preparing its default corpus), JAX's
handler warns that the fork may deadlock, and it may. `ray start --head --block` runs as a new program in its
own session instead (exec, no Python fork), the caller joins it by address, and the block's end stops it and
every process of its session. The tests start their session's cluster the same way.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator

HOST = "127.0.0.1"
# A cluster that only this machine reaches: no token to hand around.
ENV = {"RAY_AUTH_MODE": "disabled"}
START_TIMEOUT_S = 120
STOP_GRACE_S = 3
QUIET_PORTS = range(20000, 32768)  # above Ray's worker ports (10002-19999), below Linux's ephemeral 32768-60999
PORT_TRIES = 3  # a port free a moment ago may be taken before the head binds it: then it starts on another
PORT_TAKEN = ("Failed to start the grpc server", "Address already in use")  # in its log


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago, from QUIET_PORTS below the range the kernel hands to
  outgoing connections (any process's client may take one of those before the head binds it); a port the kernel
  picks when none of those is free."""
  low = ephemeral_ports()[0]
  candidates = [port for port in QUIET_PORTS if port < low]
  for port in random.sample(candidates, min(64, len(candidates))):
    with socket.socket() as probe:
      try:
        probe.bind((HOST, port))
      except OSError:
        continue
      return port
  with socket.socket() as probe:
    probe.bind((HOST, 0))
    return probe.getsockname()[1]


def ephemeral_ports() -> tuple[int, int]:
  """The (first, last) port the kernel gives outgoing connections (Linux; elsewhere IANA's 49152-65535)."""
  try:
    with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="utf-8") as f:
      first, last = map(int, f.read().split())
  except (OSError, ValueError):
    return 49152, 65535
  return first, last


@contextlib.contextmanager
def head_node(num_cpus: int, temp_dir: str | None = None, object_store_bytes: int | None = None) -> Iterator[str]:
  """Yields the `host:port` of a running Ray head with `num_cpus` CPUs; stops it and its processes after.

  `temp_dir`: Ray's session files (default: a new directory under /tmp, removed after). A head that does not
  start within START_TIMEOUT_S raises RuntimeError with the end of its output; one whose port was taken before
  it bound it is started again on another (PORT_TRIES in all).
  """
  with contextlib.ExitStack() as stack:
    if temp_dir is None:  # Ray's socket paths must stay short: /tmp, not $TMPDIR
      temp_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp",
                                                                      ignore_cleanup_errors=True))
    log_path = os.path.join(temp_dir, "head.log")  # a file, not a pipe: a full pipe would stall the head
    for attempt in range(1, PORT_TRIES + 1):
      port = free_port()
      command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
                 f"--node-ip-address={HOST}", f"--num-cpus={num_cpus}", "--include-dashboard=false",
                 "--disable-usage-stats", f"--temp-dir={temp_dir}"]
      if object_store_bytes:
        command.append(f"--object-store-memory={object_store_bytes}")
      with open(log_path, "wb") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **ENV})
      try:
        _wait_started(head, log_path, f"{HOST}:{port}")
      except BaseException as e:  # Ctrl-C included: the head runs in a session of its own
        _stop(head)
        if isinstance(e, RuntimeError) and attempt < PORT_TRIES and _port_taken(log_path):
          continue
        raise
      break
    stack.callback(_stop, head)
    yield f"{HOST}:{port}"


def _port_taken(log_path: str) -> bool:
  """Whether the head's log says it could not bind its port."""
  with open(log_path, encoding="utf-8", errors="replace") as log:
    text = log.read()
  return any(sign in text for sign in PORT_TAKEN)


def _wait_started(head: subprocess.Popen, log_path: str, address: str):
  """Returns once `head` logs that its runtime started; RuntimeError when it exits or takes too long."""
  deadline = time.monotonic() + START_TIMEOUT_S
  while time.monotonic() < deadline and head.poll() is None:
    with open(log_path, encoding="utf-8", errors="replace") as log:
      if "Ray runtime started" in log.read():
        return
    time.sleep(0.1)
  with open(log_path, encoding="utf-8", errors="replace") as log:
    tail = " | ".join(line.strip() for line in log.read().splitlines()[-5:])
  raise RuntimeError(f"the local Ray head on {address} did not start (status {head.poll()}): {tail}")


def _stop(head: subprocess.Popen):
  """Stops the head and every process of its session (Ray's workers run in process groups of their own).

  The cluster holds nothing to keep (its files go with the temporary directory), so after a SIGTERM the head
  gets STOP_GRACE_S, not the half minute `ray start --block` takes to stop its node gracefully."""
  with contextlib.suppress(ProcessLookupError):
    os.killpg(head.pid, signal.SIGTERM)
  with contextlib.suppress(subprocess.TimeoutExpired):
    head.wait(timeout=STOP_GRACE_S)
  for pid in [head.pid, *_session_members(head.pid)]:
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGKILL)
  head.wait()
  deadline = time.monotonic() + STOP_GRACE_S
  while _session_members(head.pid) and time.monotonic() < deadline:  # gone before their files are removed
    time.sleep(0.05)


def _session_members(session: int) -> list[int]:
  """The processes of session `session` (Linux's /proc; elsewhere none are found)."""
  members = []
  for stat in glob.glob("/proc/[0-9]*/stat"):
    try:
      with open(stat, encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
      continue  # it ended while looked at
    if int(fields[3]) == session and fields[0] != "Z":  # a zombie only waits to be reaped
      members.append(int(stat.split("/")[2]))
  return members
