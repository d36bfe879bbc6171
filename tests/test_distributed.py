"""yanjax.training.distributed (flag and env resolution, mode detection) and launch/local.py (real processes)."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
from absl import flags
from absl.testing import flagsaver

from yanjax.training import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_PY = os.path.join(REPO, "launch", "local.py")
# Children import this checkout's yanjax whatever is installed.
CHILD_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}


def _load_launcher():
  spec = importlib.util.spec_from_file_location("launch_local", LOCAL_PY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


local = _load_launcher()

SLURM_ENV = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


@pytest.fixture(autouse=True)
def _parsed_flags():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver():
    yield


def test_nothing_given_is_single_process():
  settings = distributed.read_settings({})
  assert settings == distributed.Settings(None, None, None, None)
  assert distributed.detect_mode(settings, {}) == "single"


def test_env_vars_are_read():
  env = {"YANJAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "YANJAX_NUM_PROCESSES": "4",
         "YANJAX_PROCESS_ID": "3", "YANJAX_LOCAL_DEVICE_COUNT": "2"}
  settings = distributed.read_settings(env)
  assert settings == distributed.Settings("10.0.0.1:1234", 4, 3, 2)
  assert distributed.detect_mode(settings, env) == "explicit"


def test_flags_win_over_env_vars():
  env = {"YANJAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "YANJAX_NUM_PROCESSES": "4",
         "YANJAX_PROCESS_ID": "3"}
  with flagsaver.flagsaver(coordinator_address="[::1]:9", process_id=0):
    assert distributed.read_settings(env) == distributed.Settings("[::1]:9", 4, 0, None)


@pytest.mark.parametrize("env, message", [
    ({"YANJAX_NUM_PROCESSES": "2"}, "needs all of --coordinator_address"),
    ({"YANJAX_COORDINATOR_ADDRESS": "h:1", "YANJAX_PROCESS_ID": "0"}, "needs all of"),
    ({"YANJAX_COORDINATOR_ADDRESS": "h", "YANJAX_NUM_PROCESSES": "2", "YANJAX_PROCESS_ID": "0"},
     "must be host:port"),
    ({"YANJAX_COORDINATOR_ADDRESS": "h:1", "YANJAX_NUM_PROCESSES": "2", "YANJAX_PROCESS_ID": "2"},
     r"process_id=2 must be in \[0, num_processes=2\)"),
    ({"YANJAX_COORDINATOR_ADDRESS": "h:1", "YANJAX_NUM_PROCESSES": "0", "YANJAX_PROCESS_ID": "0"},
     "num_processes=0 must be >= 1"),
    ({"YANJAX_NUM_PROCESSES": "two"}, r"YANJAX_NUM_PROCESSES='two' is not an integer"),
    ({"YANJAX_LOCAL_DEVICE_COUNT": "0"}, "local_device_count=0 must be >= 1"),
])
def test_bad_settings_fail_with_a_clear_message(env, message):
  with pytest.raises(ValueError, match=message):
    distributed.read_settings(env)


def test_process_id_flag_without_coordinator_fails():
  with flagsaver.flagsaver(process_id=1), pytest.raises(ValueError, match="needs all of"):
    distributed.read_settings({})


def test_slurm_with_several_tasks():
  settings = distributed.read_settings(SLURM_ENV)
  assert distributed.detect_mode(settings, SLURM_ENV) == "slurm"
  assert distributed.detect_mode(settings, {**SLURM_ENV, "SLURM_NTASKS": "1"}) == "single"
  no_step = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_STEP_NODELIST"}
  assert distributed.detect_mode(settings, no_step) == "single"  # batch shell, not an srun step


def test_explicit_wins_over_slurm():
  env = {**SLURM_ENV, "YANJAX_COORDINATOR_ADDRESS": "h:1", "YANJAX_NUM_PROCESSES": "2",
         "YANJAX_PROCESS_ID": "1"}
  assert distributed.detect_mode(distributed.read_settings(env), env) == "explicit"


def test_cloud_tpu_vm_is_a_tpu_pod(monkeypatch):
  monkeypatch.setattr(distributed.cloud_tpu_init, "running_in_cloud_tpu_vm", True)
  assert distributed.detect_mode(distributed.read_settings({}), {}) == "tpu_pod"
  assert distributed.detect_mode(distributed.read_settings(SLURM_ENV), SLURM_ENV) == "slurm"


def _probe(out, *flags_):
  return [sys.executable, os.path.join(REPO, "tests", "multiprocess_probe.py"), f"--out={out}",
          *flags_]


def test_two_processes_of_two_cpu_devices_sum_across_processes(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  codes = local.launch_local(_probe(out), num_processes=2, devices_per_process=2,
                             log_dir=str(tmp_path / "logs"), env=CHILD_ENV, timeout=120)
  logs = {p.name: p.read_text()[-3000:] for p in (tmp_path / "logs").iterdir()}
  assert codes == [0, 0], logs
  for i in range(2):
    result = json.loads((out / f"process_{i}.json").read_text())
    assert result == {"mode": "explicit", "process_index": i, "process_count": 2,
                      "device_count": 4, "local_device_count": 2,
                      "sum": 1.0 + 2.0 + 3.0 + 4.0, "gathered_indices": [0, 1]}


def test_an_uncaught_exception_ends_the_run_at_once(tmp_path, monkeypatch):
  monkeypatch.setattr(local, "GRACE_S", 1.0)  # process 0 waits in a collective, deaf to SIGTERM
  start = time.monotonic()
  codes = local.launch_local(_probe(tmp_path, "--fail_process=1"), num_processes=2,
                             devices_per_process=1, log_dir=str(tmp_path), env=CHILD_ENV,
                             timeout=50)
  assert codes[1] == 1, (tmp_path / "process_1.log").read_text()[-3000:]
  assert "fails on purpose" in (tmp_path / "process_1.log").read_text()
  assert time.monotonic() - start < 40  # not JAX's 5-minute shutdown barrier


def _fail_in_process_1(code):
  """Process 1 exits with `code`; process 0 would sleep for a minute."""
  return [sys.executable, "-c", "import os, sys, time\n"
          f"sys.exit({code}) if os.environ['YANJAX_PROCESS_ID'] == '1' else time.sleep(60)"]


def test_a_failing_process_stops_the_others(tmp_path):
  start = time.monotonic()
  codes = local.launch_local(_fail_in_process_1(3), num_processes=2, devices_per_process=1,
                             log_dir=str(tmp_path), timeout=50)
  assert codes == [-15, 3]  # process 0 stopped by SIGTERM well before its minute
  assert time.monotonic() - start < 30


def test_cli_exits_with_the_first_failure(tmp_path):
  result = subprocess.run(
      [sys.executable, LOCAL_PY, "--num_processes", "2", "--log_dir", str(tmp_path), "--timeout",
       "50", "--", *_fail_in_process_1(5)], capture_output=True, text=True, timeout=60)
  assert result.returncode == 5, result.stderr
  assert "process 1 exited with 5 first" in result.stderr
  assert sorted(os.listdir(tmp_path)) == ["process_0.log", "process_1.log"]


def test_timeout_stops_every_process(tmp_path):
  command = [sys.executable, "-c", "import time; time.sleep(60)"]
  codes = local.launch_local(command, num_processes=2, devices_per_process=1,
                             log_dir=str(tmp_path), timeout=1)
  assert codes == [-15, -15]
