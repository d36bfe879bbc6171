"""JAX's preemption notice on a multi-host run: SIGTERM to one host makes every host save at one step, exit 42."""

import os
import signal
import subprocess
import sys
import time

import pytest
import s3_server
from test_train import REPO, tiny_flags

from yanjax.core.cli import PREEMPTED_EXIT_CODE


@pytest.mark.slow
def test_sigterm_to_one_host_saves_on_all_at_the_sync_point(small_store, tmp_path):
  # Log (and agree on signals by allgather) only every 100000 steps: only JAX's preemption service can stop
  # this run promptly, through `reached_preemption_sync_point`.
  flags = tiny_flags(small_store, steps=100000, eval_every=100000, log_every=100000) + [
      "--config.checkpoint.every_steps=100000", "--config.mesh.data=2", "--config.mesh.fsdp=2"]
  coordinator = f"127.0.0.1:{s3_server.free_port()}"
  procs = []
  for index in range(2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "YANJAX_COORDINATOR_ADDRESS": coordinator,
           "YANJAX_NUM_PROCESSES": "2", "YANJAX_PROCESS_ID": str(index), "YANJAX_LOCAL_DEVICE_COUNT": "2"}
    log = open(tmp_path / f"process_{index}.log", "w", encoding="utf-8")  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen([sys.executable, "-m", "yanjax.main.train", f"--workdir={tmp_path / 'w'}", *flags],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  try:
    deadline = time.time() + 240
    while "compilation cache" not in (tmp_path / "process_0.log").read_text():  # said after the first step
      assert all(p.poll() is None for p in procs) and time.time() < deadline, \
          (tmp_path / "process_0.log").read_text()[-3000:]
      time.sleep(0.1)
    time.sleep(1.0)
    procs[1].send_signal(signal.SIGTERM)  # the notice reaches one host only
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = [(tmp_path / f"process_{i}.log").read_text() for i in range(2)]
  assert codes == [PREEMPTED_EXIT_CODE] * 2, logs[0][-3000:] + logs[1][-3000:]
  steps = [int(p.name) for p in (tmp_path / "w/checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 100000
