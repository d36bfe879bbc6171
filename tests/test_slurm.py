"""The Slurm recipes, run on a real one-node cluster (launch/slurm_local_cluster.sh: Debian's slurm-wlm on
127.0.0.1, installed and started here): launch/slurm.sbatch, submitted unchanged, and a sweep's job array
train, get SIGTERM from Slurm (`scancel --signal=TERM`, which reaches the job steps' tasks as `--signal=TERM@120`
does), save, exit 42, requeue themselves and finish from their checkpoints.

The cluster needs root (or slurm-wlm installed and the daemons started): without it these tests fail, they do
not skip.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest
from test_train import MODEL, REPO, tiny_flags

from yanjax.core.cli import PREEMPTED_EXIT_CODE

CLUSTER_SCRIPT = REPO / "launch/slurm_local_cluster.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="module")
def slurm_cluster():
  """Starts the local cluster (installing slurm-wlm where missing); stops it afterwards if it was not up before
  (not under pytest-xdist, where another worker may still use it)."""
  was_up = shutil.which("sinfo") is not None and subprocess.run(
      ["sinfo"], capture_output=True, check=False).returncode == 0
  start = subprocess.run(["bash", str(CLUSTER_SCRIPT)], capture_output=True, text=True, timeout=1200, check=False)
  if start.returncode != 0:
    pytest.fail(f"could not start the local Slurm cluster with {CLUSTER_SCRIPT} (needs root and apt-get, or "
                f"slurm-wlm installed):\n{start.stdout}{start.stderr}", pytrace=False)
  yield
  if not was_up and "PYTEST_XDIST_WORKER" not in os.environ:
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=60, check=False)


def slurm_env(**extra) -> dict[str, str]:
  """This environment (sbatch passes it on to the job) with this Python first on PATH."""
  return {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}", **extra}


def sbatch(args: list[str], env: dict[str, str]) -> str:
  proc = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=60, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout.strip().split(";")[0]


def job_records(job: str) -> list[dict[str, str]]:
  """`scontrol show job` of a job (one record per array task), as key -> value."""
  proc = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30,
                        check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in proc.stdout.splitlines() if line.strip()]


def read(path: pathlib.Path) -> str:
  return path.read_text(errors="replace") if path.exists() else ""


def loss_steps(metrics: pathlib.Path) -> list[int]:
  return [json.loads(line)["step"] for line in read(metrics).splitlines() if '"loss"' in line]


def wait_until(condition, timeout: float, what: str, context) -> None:
  """Polls `condition` (every 0.2 s) until true; fails with `context()` (logs, job state) after `timeout` s."""
  deadline = time.monotonic() + timeout
  while not condition():
    if time.monotonic() > deadline:
      pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{context()}")
    time.sleep(0.2)


def wait_for_steps(metrics: pathlib.Path, job: str, context) -> None:
  """Waits until the run has logged 2 steps; fails at once if the job ends first."""
  def logged():
    records = job_records(job)
    assert not any(r["JobState"] in FINAL_STATES for r in records), f"job ended before training\n{context()}"
    return len(loss_steps(metrics)) >= 2
  wait_until(logged, 180, f"2 steps in {metrics}", context)


def all_done(job: str) -> bool:
  records = job_records(job)
  return all(r["JobState"] in FINAL_STATES for r in records)


def tail(text: str, chars: int = 4000) -> str:
  return text.replace("\r", "\n")[-chars:]


@pytest.mark.slow
def test_slurm_sbatch_preempt_requeue_resume(slurm_cluster, small_store, tmp_path):
  """2 tasks x 2 CPU devices (mesh data=2 x fsdp=2): SIGTERM, save, exit 42, requeue, resume, finish."""
  steps = 150  # the signal comes after step 2; 148 steps leave it seconds to arrive
  workdir = tmp_path / "run"
  flags = [f for f in tiny_flags(small_store, steps=steps, eval_every=steps) if not f.startswith("--config=")]
  flags += ["--config.checkpoint.every_steps=100000", "--config.mesh.data=2", "--config.mesh.fsdp=2"]
  job = sbatch(["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", f"--output={tmp_path}/yanjax-%j.out",
                "--export=ALL,YANJAX_LOCAL_DEVICE_COUNT=2", "launch/slurm.sbatch", "configs/yan_tiny.py",
                str(workdir), *flags], slurm_env())
  log = tmp_path / f"yanjax-{job}.out"
  def context():
    return f"job {job}: {job_records(job)}\n---- {log} ----\n{tail(read(log))}"
  try:
    wait_for_steps(workdir / "metrics.jsonl", job, context)
    subprocess.run(["scancel", "--signal=TERM", job], check=True, timeout=30)
    wait_until(lambda: all_done(job), 300, "the requeued job to finish", context)
  finally:
    subprocess.run(["scancel", job], capture_output=True, timeout=30, check=False)
  text = read(log)
  [record] = job_records(job)
  assert (record["JobState"], record["Restarts"], record["ExitCode"]) == ("COMPLETED", "1", "0:0"), context()
  stopped = re.findall(rf"stopped at step (\d+) \(exit code {PREEMPTED_EXIT_CODE}\)", text)
  assert len(stopped) == 2 and len(set(stopped)) == 1, context()  # both processes, at one step
  stop_step = int(stopped[0])
  assert 2 <= stop_step < steps
  # srun reports both tasks' exit code, together ("tasks 0-1") or one by one.
  exited = re.findall(rf"localhost: tasks? ([0-9-]+): Exited with exit code {PREEMPTED_EXIT_CODE}", text)
  assert sorted(exited) in (["0-1"], ["0", "1"]), context()
  for line in (f"job {job} (restart 0): 1 nodes x 2 tasks x 2 CPU devices per node",
               f"trainer saved and stopped (exit {PREEMPTED_EXIT_CODE}): requeueing job {job}",
               f"job {job} (restart 1):", f"resumed from the checkpoint at step {stop_step} in {workdir}"):
    assert line in text, f"{line!r} not in the log\n{context()}"
  assert loss_steps(workdir / "metrics.jsonl") == list(range(1, steps + 1))  # every step, once
  assert (workdir / "checkpoints" / str(steps)).exists()


SWEEP_SPEC = '''
def get_sweep():
  return dict(
      families={{"yan": "{repo}/configs/yan_tiny.py"}},
      sizes={{"w16": dict(width=16, channels=2, mlp_width=48, layers=1, vocab_size={vocab}),
             "w32": dict(width=32, channels=2, mlp_width=64, layers=2, vocab_size={vocab})}},
      tokens=[{tokens}],
      config=dict(train=dict(global_batch=8, seq_len=32, log_every=1, eval_batches=1),
                  optimizer=dict(warmup_steps=2),
                  data=dict(stores=("{store}",), prepare_default=False)),
  )
'''


@pytest.mark.slow
def test_slurm_sweep_array_preempt_requeue_resume(slurm_cluster, small_store, tmp_path):
  """A 2-point sweep as a job array: task 0 gets SIGTERM, requeues and finishes its point; task 1 runs through."""
  steps = 150
  spec = tmp_path / "spec.py"
  spec.write_text(SWEEP_SPEC.format(repo=REPO, vocab=MODEL["vocab_size"], tokens=steps * 8 * 32,
                                    store=small_store))
  out = tmp_path / "sweep"
  launch = subprocess.run([sys.executable, "-m", "yanjax.main.sweep", "launch", "--spec", str(spec), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert launch.returncode == 0, launch.stdout + launch.stderr
  script = out / "sweep.sbatch"
  assert "#SBATCH --array=0-1" in script.read_text()
  job = sbatch(["--gpus-per-task=0", str(script)], slurm_env())
  point = out / "points" / f"yan-w16-D{steps * 8 * 32:.3g}"
  logs = [out / f"slurm-{job}_{task}.log" for task in (0, 1)]
  def context():
    return f"job {job}: {job_records(job)}\n" + "".join(
        f"---- {path} ----\n{tail(read(path), 2500)}\n" for path in [*logs, point / "train.log"])
  try:
    wait_for_steps(point / "metrics.jsonl", job, context)
    subprocess.run(["scancel", "--signal=TERM", f"{job}_0"], check=True, timeout=30)
    wait_until(lambda: all_done(job), 300, "both array tasks to finish", context)
  finally:
    subprocess.run(["scancel", job], capture_output=True, timeout=30, check=False)
  records = {r["ArrayTaskId"]: r for r in job_records(job)}
  assert {t: (r["JobState"], r["Restarts"], r["ExitCode"]) for t, r in records.items()} == {
      "0": ("COMPLETED", "1", "0:0"), "1": ("COMPLETED", "0", "0:0")}, context()
  task0 = read(logs[0])
  for line in (f"task {job}_0 (restart 0): point 0", f"stopped by a signal (exit code {PREEMPTED_EXIT_CODE})",
               f"trainer saved and stopped (exit {PREEMPTED_EXIT_CODE}): requeueing job {job}_0",
               f"task {job}_0 (restart 1): point 0", "1/1 points finished"):
    assert line in task0, f"{line!r} not in task 0's log\n{context()}"
  train_log = read(point / "train.log")
  stop_step = int(re.search(rf"stopped at step (\d+) \(exit code {PREEMPTED_EXIT_CODE}\)", train_log)[1])
  assert f"resumed from the checkpoint at step {stop_step} in {point}" in train_log, context()
  assert loss_steps(point / "metrics.jsonl") == list(range(1, steps + 1))
  assert "restart 1" not in read(logs[1]) and "1/1 points finished" in read(logs[1])
  # The finished sweep is what `sweep fit` reads: one result per point (two points are too few for a law,
  # which `sweep fit` refuses with the count, writing nothing).
  results = [json.loads(read(p)) for p in sorted((out / "points").glob("*/result.json"))]
  assert sorted(r["size"] for r in results) == ["w16", "w32"], context()
  assert all(0 < r["val_loss"] < 10 and r["tokens"] == steps * 8 * 32 for r in results)
  fit = subprocess.run([sys.executable, "-m", "yanjax.main.sweep", "fit", "--out", str(out), "--bootstrap", "5"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert fit.returncode == 2 and "at least 5" in fit.stderr, fit.stdout + fit.stderr
