"""A real Ray cluster for the tests: one head node on 127.0.0.1 per test session, which every test process
(pytest-xdist workers included) joins through $RAY_ADDRESS."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time

import s3_server

CPUS = 2
ENV = {"RAY_AUTH_MODE": "disabled"}  # a cluster on 127.0.0.1 for one test session: no token to hand around


@contextlib.contextmanager
def head_node(temp_dir: str):
  """Yields the address of a running Ray head (`ray start --head --block`); stops it and its processes after."""
  port = s3_server.free_port()
  ray = shutil.which("ray")
  command = [ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", f"--num-cpus={CPUS}",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
             "--object-store-memory=500000000"]
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True, env={**os.environ, **ENV})
  address = f"127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 120
    for line in proc.stdout:
      if "Ray runtime started" in line:
        break
      if time.monotonic() > deadline:
        raise RuntimeError(f"the Ray head did not start on {address}")
    else:
      raise RuntimeError(f"the Ray head exited before starting (status {proc.wait()})")
    yield address
  finally:
    os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
    try:
      proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
