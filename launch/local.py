"""Runs a command as N processes of one multi-host JAX run on this machine, each standing in for a host.

  python launch/local.py --num_processes 2 --devices_per_process 2 -- \\
      python -m yanjax.main.train --config configs/yan_tiny.py --workdir /tmp/yan_tiny_2proc

Each process gets YANJAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), YANJAX_NUM_PROCESSES,
YANJAX_PROCESS_ID, YANJAX_LOCAL_DEVICE_COUNT (read by `yanjax.training.distributed.initialize_from_flags`),
JAX_PLATFORMS=cpu, and its own log, <log_dir>/process_<i>.log; process 0's output is also shown here.
When one process fails the others are stopped (SIGTERM, then SIGKILL); the exit status is that of
the first to fail (128 + signal if killed), 124 on timeout, else 0.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple, TextIO

GRACE_S = 10.0  # between SIGTERM and SIGKILL when stopping processes
_POLL_S = 0.05
TIMEOUT_EXIT_CODE = 124


class Outcome(NamedTuple):
  """How a launch ended."""
  codes: list[int]  # per process; -N: killed by signal N
  first_failure: int | None  # index of the process that failed first
  timed_out: bool


def _free_port() -> int:
  """A TCP port free on 127.0.0.1 now (the coordinator binds it moments later)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _process_env(env: Mapping[str, str] | None, port: int, num_processes: int,
                 devices_per_process: int, process_id: int) -> dict[str, str]:
  return {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      **(env or {}),
      "YANJAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "YANJAX_NUM_PROCESSES": str(num_processes),
      "YANJAX_PROCESS_ID": str(process_id),
      "YANJAX_LOCAL_DEVICE_COUNT": str(devices_per_process),
  }


def _tee(source: TextIO, log: TextIO, out: TextIO) -> None:
  """Copies process 0's output to its log and to `out`, line by line."""
  for line in source:
    log.write(line)
    log.flush()
    out.write(line)
    out.flush()


def _wait(procs: Sequence[subprocess.Popen], timeout: float | None) -> tuple[int | None, bool]:
  """Waits until all succeed, one fails (returns its index) or the timeout passes."""
  deadline = None if timeout is None else time.monotonic() + timeout
  while True:
    codes = [p.poll() for p in procs]
    failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
    if failed:
      return failed[0], False
    if None not in codes:
      return None, False
    if deadline is not None and time.monotonic() > deadline:
      return None, True
    time.sleep(_POLL_S)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(proc.pid, sig)
  except ProcessLookupError:
    pass


def _stop(procs: Sequence[subprocess.Popen]) -> None:
  """SIGTERM the process group of each running process, SIGKILL those still running after GRACE_S."""
  running = [p for p in procs if p.poll() is None]
  for proc in running:
    _signal_group(proc, signal.SIGTERM)
  deadline = time.monotonic() + GRACE_S
  for proc in running:
    try:
      proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      _signal_group(proc, signal.SIGKILL)
      proc.wait()


def run(command: Sequence[str], num_processes: int, devices_per_process: int, log_dir: str,
        env: Mapping[str, str] | None = None, timeout: float | None = None) -> Outcome:
  """Starts the processes, waits for them and stops the rest on the first failure or the timeout."""
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"need num_processes >= 1 and devices_per_process >= 1, got {num_processes} "
                     f"and {devices_per_process}")
  if not command:
    raise ValueError("empty command")
  os.makedirs(log_dir, exist_ok=True)
  port = _free_port()
  procs, logs, tee = [], [], None
  try:
    for i in range(num_processes):
      logs.append(open(os.path.join(log_dir, f"process_{i}.log"), "w"))
      procs.append(subprocess.Popen(
          command, env=_process_env(env, port, num_processes, devices_per_process, i),
          stdout=subprocess.PIPE if i == 0 else logs[i], stderr=subprocess.STDOUT, text=True,
          errors="replace", start_new_session=True))  # own group: stoppable with its children
    tee = threading.Thread(target=_tee, args=(procs[0].stdout, logs[0], sys.stdout), daemon=True)
    tee.start()
    first_failure, timed_out = _wait(procs, timeout)
  finally:
    _stop(procs)
    if tee is not None:
      tee.join()
    for log in logs:
      log.close()
  codes = [p.returncode for p in procs]
  if timed_out:
    print(f"launch/local.py: timed out after {timeout} s; logs in {log_dir}", file=sys.stderr)
  elif first_failure is not None:
    print(f"launch/local.py: process {first_failure} exited with {codes[first_failure]} first; "
          f"exit codes {codes} (the cause may be in any process_<i>.log in {log_dir})",
          file=sys.stderr)
  return Outcome(codes, first_failure, timed_out)


def launch_local(command: Sequence[str], num_processes: int, devices_per_process: int,
                 log_dir: str, env: Mapping[str, str] | None = None,
                 timeout: float | None = None) -> list[int]:
  """Runs `command` as `num_processes` processes; returns their exit codes (-N: killed by signal N).

  `env` is added to this process's environment (after JAX_PLATFORMS=cpu, before the YANJAX_* vars).
  """
  return run(command, num_processes, devices_per_process, log_dir, env, timeout).codes


def _exit_status(outcome: Outcome) -> int:
  """The launcher's exit status: the first failure's code (128 + signal if killed), 124 on timeout."""
  if outcome.timed_out:
    return TIMEOUT_EXIT_CODE
  if outcome.first_failure is None:
    return 0
  code = outcome.codes[outcome.first_failure]
  return code if code > 0 else 128 - code


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1, help="CPU devices per process")
  parser.add_argument("--log_dir", help="default: a new temporary directory")
  parser.add_argument("--timeout", type=float, help="seconds; default: none")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --")
  log_dir = args.log_dir or tempfile.mkdtemp(prefix="yanjax_local_")
  print(f"launch/local.py: {args.num_processes} processes x {args.devices_per_process} CPU devices; "
        f"logs in {log_dir}", file=sys.stderr)
  try:
    outcome = run(command, args.num_processes, args.devices_per_process, log_dir,
                  timeout=args.timeout)
  except KeyboardInterrupt:  # `run` has stopped the processes
    return 130
  return _exit_status(outcome)


if __name__ == "__main__":
  sys.exit(main())
