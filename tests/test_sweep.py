"""Sweep runner: a tiny real sweep on the default corpus runs end to end, skips finished points, fits and plots;
the Slurm array script requeues preempted points; a sweep directory may be in a bucket."""

import glob
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest

from yanjax.core import storage
from yanjax.core.cli import PREEMPTED_EXIT_CODE
from yanjax.core.config import ConfigError
from yanjax.main import sweep as sweep_cli
from yanjax.scaling import sweep
from yanjax.scaling.laws import FitError

REPO = pathlib.Path(__file__).resolve().parent.parent

SPEC = '''
def get_sweep():
  return dict(
      families={families},
      sizes={{"w16": dict(width=16, channels=2, mlp_width=48, layers=1),
             "w32": dict(width=32, channels=2, mlp_width=96, layers=1),
             "w48": dict(width=48, channels=3, mlp_width=144, layers=1)}},
      tokens=[4096, 8192],
      config=dict(train=dict(global_batch=4, seq_len=32, log_every=8, eval_batches=1{cache}),
                  optimizer=dict(warmup_steps=4),
                  data=dict(stores=("{store}",), validation_fraction=0.05)),
  )
'''


FAMILIES = {"yan": f"{REPO}/configs/yan_tiny.py", "attention": f"{REPO}/configs/yan_tiny.py:attention"}


def spec_text(store, families=tuple(FAMILIES)) -> str:
  """SPEC of `families` on `store`, its points compiling through the test session's compilation cache when
  there is one."""
  return SPEC.format(families={f: FAMILIES[f] for f in families}, store=store, cache=cache_setting())


def cache_setting() -> str:
  """`, compilation_cache=...` for a spec's train settings: the test session's cache, when there is one."""
  cache = os.environ.get("YANJAX_TEST_COMPILATION_CACHE")
  return f", compilation_cache={cache!r}" if cache else ""


@pytest.fixture(scope="module")
def store_2048(tmp_path_factory):
  """A token store of 120 standard-library modules at yan_tiny's vocabulary (2048), prepared once."""
  from data_pipelines import prepare  # pylint: disable=import-outside-toplevel
  files = sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/*.py"))[:120]
  out = tmp_path_factory.mktemp("sweep_store") / "stdlib"
  assert prepare.main(["--output", str(out), "--vocab_size", "2048", "--validation_fraction", "0.1", *files]) == 0
  return out


def test_spec_errors(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_sweep():\n  return dict(families={}, sizes={}, budgets=[1])\n")
  with pytest.raises(ValueError, match="budgets"):
    sweep.load_spec(bad)


def test_a_family_whose_pattern_does_not_fit_a_size_is_named_with_the_size(tmp_path):
  """SPEC's sizes have one layer; the hybrid's pattern needs a multiple of two."""
  spec = tmp_path / "spec.py"
  spec.write_text(SPEC.format(families={"hybrid": f"{REPO}/configs/yan_tiny.py:hybrid"}, store="s", cache=""))
  with pytest.raises(ConfigError, match=r"^sweep family 'hybrid' \(.*yan_tiny\.py:hybrid\) at size 'w16': "
                                        r"model\.pattern=\('swa', 'mcsd'\): its length 2 must divide model\.layers=1$"):
    sweep.points(sweep.load_spec(spec))


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path, capsys, store_2048):
  """One family's 3 sizes x 2 budgets (a fit takes at least 5 points); fitting several families is
  test_scaling_fit's to prove, launching both families' grid test_array_script_requeues_on_preempted_exit's."""
  spec = tmp_path / "spec.py"
  spec.write_text(spec_text(store_2048, families=("yan",)))
  out = tmp_path / "sweep"
  grid = sweep.points(sweep.load_spec(spec))
  assert len(grid) == 6 and {p.family for p in grid} == {"yan"}
  assert sweep_cli.main(["run", "--spec", str(spec), "--out", str(out)]) == 0
  records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  assert len(records) == 6
  for r in records:
    assert r["params"] > 0 and r["tokens"] in (4096, 8192) and r["flops"] > 0 and 0 < r["val_loss"] < 10
  capsys.readouterr()
  assert sweep_cli.main(["run", "--spec", str(spec), "--out", str(out)]) == 0  # finished points are skipped
  assert capsys.readouterr().out.count("done already, skipped") == 6
  assert sweep_cli.main(["launch", "--spec", str(spec), "--out", str(out)]) == 0
  assert "#SBATCH --array=0-5" in (out / "sweep.sbatch").read_text()
  assert sweep_cli.main(["fit", "--out", str(out), "--bootstrap", "5"]) == 0
  fits = json.loads((out / "fits/fit.json").read_text())
  assert set(fits) >= {"yan"} or set(fits.get("families", {})) >= {"yan"}
  for png in ("loss_vs_flops.png", "frontier.png"):
    assert (out / "fits" / png).stat().st_size > 10_000


@pytest.mark.slow
def test_failed_point_is_reported_and_the_rest_run(tmp_path, capsys, store_2048):
  """A 4096-vocabulary model fails on the store of vocabulary 2048; the point after it still runs."""
  spec = tmp_path / "spec.py"
  spec.write_text(f'''
def get_sweep():
  return dict(
      families={{"yan": "{REPO}/configs/yan_tiny.py"}},
      sizes={{"bad_vocab": dict(width=16, channels=2, mlp_width=48, layers=1, vocab_size=4096),
             "ok": dict(width=24, channels=2, mlp_width=48, layers=1)}},
      tokens=[2048],
      config=dict(train=dict(global_batch=4, seq_len=32, eval_batches=1{cache_setting()}),
                  optimizer=dict(warmup_steps=2), data=dict(stores=("{store_2048}",))),
  )
''')
  out = tmp_path / "sweep"
  assert sweep_cli.main(["run", "--spec", str(spec), "--out", str(out)]) == 1
  printed = capsys.readouterr().out
  assert "yan-bad_vocab-D2.05e+03: FAILED" in printed and "failed: ['yan-bad_vocab-D2.05e+03']" in printed
  records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  assert [r["size"] for r in records] == ["ok"]  # the point after the failure ran


def _running(pid: int) -> bool:
  """Whether process `pid` exists and is not a zombie (a killed orphan may wait to be reaped)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def _lease_holder(lease: pathlib.Path, other_than: int | None, within_s: float) -> int:
  """The pid in `lease` once one other than `other_than` holds it (a trainer takes it first thing)."""
  deadline = time.time() + within_s
  while True:
    try:
      pid = json.loads(lease.read_text())["pid"]
      if pid != other_than:
        return pid
    except (FileNotFoundError, ValueError, KeyError):
      pass
    assert time.time() < deadline, f"no trainer took {lease} within {within_s} s"
    time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_sweep_takes_its_trainer_with_it_and_its_rerun_takes_the_point_over(tmp_path, store_2048):
  """A point that trains for minutes: the sweep is SIGKILLed mid-point, then re-run and stopped by SIGTERM."""
  spec = tmp_path / "spec.py"
  spec.write_text(spec_text(store_2048).replace("tokens=[4096, 8192]", "tokens=[50_000_000]"))
  out = tmp_path / "sweep"
  command = [sys.executable, "-m", "yanjax.main.sweep", "run", "--spec", str(spec), "--out", str(out), "--only", "0"]
  workdir = out / "points" / sweep.points(sweep.load_spec(spec))[0].id
  killed = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  trainer = _lease_holder(workdir / "lease.json", None, within_s=120)
  killed.kill()
  killed.wait()
  deadline = time.time() + 5
  while _running(trainer):
    assert time.time() < deadline, f"the trainer (pid {trainer}) outlived its SIGKILLed sweep"
    time.sleep(0.05)
  rerun = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    assert _running(_lease_holder(workdir / "lease.json", trainer, within_s=120))
  finally:
    rerun.send_signal(signal.SIGTERM)  # passed on to its trainer, which saves and exits 42
    printed, _ = rerun.communicate(timeout=120)
  assert rerun.returncode == PREEMPTED_EXIT_CODE, printed[-3000:]
  assert "took over the stale lease" in (workdir / "train.log").read_text()


# ---------------------------------------------------------------------------------------------------------
# The Slurm array script: preemption requeues the task through the piece slurm.sbatch shares.

FAKE_SLURM = {
    "srun": '#!/bin/bash\necho "$@" >> "$FAKE_LOG.srun"\nexit "${FAKE_SRUN_EXIT}"\n',
    "scontrol": '#!/bin/bash\necho "$@" >> "$FAKE_LOG.scontrol"\n',
}


def run_with_fake_slurm(tmp_path, command, srun_exit, env, cwd=None):
  """Runs `command` with stub srun/scontrol on PATH; returns (exit code, output, srun args, scontrol args)."""
  bin_dir = tmp_path / "fake_bin"
  bin_dir.mkdir(exist_ok=True)
  for name, text in FAKE_SLURM.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  log = tmp_path / f"fake_{os.urandom(4).hex()}"  # this call's record
  env = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
         "FAKE_SRUN_EXIT": str(srun_exit)}
  proc = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
  calls = [(pathlib.Path(f"{log}.{name}").read_text() if pathlib.Path(f"{log}.{name}").exists() else "")
           for name in ("srun", "scontrol")]
  return proc.returncode, proc.stdout + proc.stderr, *calls


def test_array_script_requeues_on_preempted_exit(tmp_path, monkeypatch):
  spec = tmp_path / "spec.py"
  spec.write_text(spec_text(tmp_path / "stdlib"))
  out = tmp_path / "sweep"
  monkeypatch.chdir(tmp_path)
  assert sweep_cli.main(["launch", "--spec", str(spec), "--out", str(out)]) == 0
  script = out / "sweep.sbatch"
  text = script.read_text()
  print(text)
  for line in ("#SBATCH --array=0-11", "#SBATCH --requeue", "#SBATCH --signal=TERM@120",
               "#SBATCH --open-mode=append", f"#SBATCH --output={out}/slurm-%A_%a.log",
               f"source {REPO}/launch/requeue_on_preempt.sh",
               'requeue_on_preempt $? "${task}"', 'task="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"'):
    assert line in text, line
  assert "$$" not in text and "${spec}" not in text
  assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0

  slurm_env = {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}
  code, output, srun, scontrol = run_with_fake_slurm(tmp_path, ["bash", str(script)], 42, slurm_env, cwd="/")
  print(output)
  assert code == 0 and scontrol == "requeue 77_3\n"
  assert srun == f"python -m yanjax.main.sweep run --spec {spec} --out {out} --only 3\n"
  code, _, _, scontrol = run_with_fake_slurm(tmp_path, ["bash", str(script)], 1, slurm_env, cwd="/")
  assert code == 1 and scontrol == ""

  # The trainer's script shares the same piece, and its exit code is the trainer's.
  from yanjax.core.cli import PREEMPTED_EXIT_CODE  # pylint: disable=import-outside-toplevel
  assert f"PREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE} " in (REPO / "launch/requeue_on_preempt.sh").read_text()
  job_env = {"SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "9", "SLURM_GPUS_ON_NODE": "2",
             "SLURM_JOB_NUM_NODES": "1"}
  command = ["bash", str(REPO / "launch/slurm.sbatch"), "configs/yan_tiny.py", "/tmp/wd"]
  code, output, srun, scontrol = run_with_fake_slurm(tmp_path, command, 42, job_env, cwd=tmp_path)
  print(output)
  assert code == 0 and scontrol == "requeue 9\n" and "yanjax.main.train --config configs/yan_tiny.py" in srun
  code, _, _, scontrol = run_with_fake_slurm(tmp_path, command, 3, job_env, cwd=tmp_path)
  assert code == 3 and scontrol == ""


def test_launch_with_bucket_out_writes_script_here(tmp_path, monkeypatch, s3_bucket):
  spec = tmp_path / "spec.py"
  spec.write_text(spec_text(tmp_path / "stdlib"))
  monkeypatch.chdir(tmp_path)
  assert sweep_cli.main(["launch", "--spec", str(spec), "--out", f"{s3_bucket}/sweep"]) == 0
  text = (tmp_path / "sweep.sbatch").read_text()
  assert f"--out {s3_bucket}/sweep --only" in text and f"#SBATCH --output={tmp_path}/slurm-%A_%a.log" in text


FAKE_TRAINER = '''#!/bin/bash
echo started >> "{calls}"
trap 'echo "trainer: saved"; exit 42' TERM
kill -TERM "$PPID"  # the sweep's process, as Slurm's --signal would; the sweep passes it on to us
sleep 5 & wait $!
'''


def test_signal_is_passed_to_trainer_and_exit_code_42_propagates(tmp_path, monkeypatch):
  spec = tmp_path / "spec.py"
  spec.write_text(spec_text(tmp_path / "stdlib"))
  calls = tmp_path / "calls"
  trainer = tmp_path / "fake_trainer"
  trainer.write_text(FAKE_TRAINER.format(calls=calls))
  trainer.chmod(0o755)
  monkeypatch.setattr(sys, "executable", str(trainer))  # run_point starts `sys.executable -m yanjax.main.train`
  out = tmp_path / "sweep"
  assert sweep_cli.main(["run", "--spec", str(spec), "--out", str(out)]) == 42
  assert calls.read_text() == "started\n"  # no further point started
  logs = list(out.glob("points/*/train.log"))
  assert len(logs) == 1 and "trainer: saved" in logs[0].read_text()
  assert sweep_cli.main(["run", "--spec", str(spec), "--out", str(out), "--only", "4"]) == 42
  assert (out / "results.jsonl").read_text() == ""


# ---------------------------------------------------------------------------------------------------------
# A sweep directory in a bucket.


def test_fit_reads_and_writes_sweep_in_s3(tmp_path, monkeypatch, s3_bucket):
  """Synthetic points of a 4 x 4 grid (Chinchilla's law, 1% noise) in s3://; `sweep fit` writes its fits there."""
  monkeypatch.chdir(tmp_path)
  out = f"{s3_bucket}/sweep"
  rng = np.random.default_rng(0)
  for n in np.geomspace(1e6, 1e9, 4):
    for d in np.geomspace(1e8, 1e11, 4):
      loss = (1.69 + 406.4 / n**0.34 + 410.7 / d**0.28) * math.exp(0.01 * rng.standard_normal())
      record = {"id": f"yan-N{n:.3g}-D{d:.3g}", "family": "yan", "params": n, "tokens": d, "flops": 6 * n * d,
                "val_loss": loss, "flop_budget": None}
      (storage.as_path(out) / "points" / record["id"] / "result.json").write_text(json.dumps(record))
  assert sweep_cli.main(["fit", "--out", out, "--bootstrap", "5"]) == 0
  remote = storage.as_path(out)
  assert len(remote.joinpath("results.jsonl").read_text().splitlines()) == 16
  fits = json.loads(remote.joinpath("fits/fit.json").read_text())
  assert fits["yan"]["runs"] == 16 and fits["yan"]["approach2"] is None
  assert 0.3 < fits["yan"]["approach3"]["params"]["a"] < 0.6
  for png in ("loss_vs_flops.png", "frontier.png"):
    assert remote.joinpath("fits", png).read_bytes()[:4] == b"\x89PNG"
  assert not remote.joinpath("fits/isoflop.png").exists()
  assert list(tmp_path.iterdir()) == []  # nothing written locally (no "s3:" directory)


# ---------------------------------------------------------------------------------------------------------
# A fit that cannot be done is refused in one line and leaves the earlier results as they were.

EARLIER = {"results.jsonl": b'{"id": "earlier"}\n', "fits/fit.json": b'{"yan": {"runs": 16}}\n',
           "fits/frontier.png": b"\x89PNG earlier"}


def _earlier_fit(out):
  for name, data in EARLIER.items():
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_bytes(data)


def _unchanged(out):
  return all((out / name).read_bytes() == data for name, data in EARLIER.items())


def _write_point(out, family, n, d, budget=None, noise=0.0):
  loss = (1.69 + 406.4 / n**0.34 + 410.7 / d**0.28) * math.exp(noise)
  record = {"id": f"{family}-N{n:.3g}-D{d:.3g}", "family": family, "params": n, "tokens": d, "flops": 6 * n * d,
            "val_loss": loss, "flop_budget": budget}
  path = out / "points" / record["id"] / "result.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(record))


def _sweep_fit_cli(out):
  proc = subprocess.run([sys.executable, "-m", "yanjax.main.sweep", "fit", "--out", str(out), "--bootstrap", "5"],
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  return proc.returncode, proc.stderr.strip().splitlines()


def test_fit_without_points_is_refused_and_keeps_earlier_results(tmp_path):
  out = tmp_path / "sweep"
  _earlier_fit(out)  # the points directory moved away
  code, lines = _sweep_fit_cli(out)
  assert code == 2 and len(lines) == 1, lines
  assert lines[0].startswith(f"error: sweep fit: {out}/points does not exist") and "left as they were" in lines[0]
  assert _unchanged(out)
  (out / "points").mkdir()  # an empty points directory
  with pytest.raises(ConfigError, match=f"no finished point under {out}/points"):
    sweep_cli.main(["fit", "--out", str(out)])
  assert _unchanged(out)


@pytest.mark.slow
def test_fit_with_fewer_points_than_parameters_is_refused_with_the_count(tmp_path):
  out = tmp_path / "sweep"
  _earlier_fit(out)
  _write_point(out, "yan", 1e6, 1e8)  # one finished point: five parameters cannot be fitted to it
  code, lines = _sweep_fit_cli(out)
  assert code == 2 and len(lines) == 1, lines
  assert "family 'yan': approach 3 fits 5 parameters" in lines[0] and "got 1" in lines[0], lines
  assert _unchanged(out)
  for n in (1e7, 1e8, 1e9):
    _write_point(out, "yan", n, 1e8)
  _write_point(out, "yan", 1e9, 1e8)  # the same (N, D) again adds nothing
  with pytest.raises(FitError, match="needs at least 5 distinct .* got 4"):
    sweep_cli.main(["fit", "--out", str(out), "--bootstrap", "5"])
  assert _unchanged(out)


@pytest.mark.slow
def test_fit_with_too_few_sizes_per_budget_reports_approach_3_alone(tmp_path, capsys):
  """A 4 x 4 grid of sizes and token budgets, and three FLOP budgets of two sizes each: approach 3 has its 22
  points; approach 2, which needs three sizes a budget, is refused with the count, and said so."""
  out = tmp_path / "sweep"
  _earlier_fit(out)
  rng = np.random.default_rng(0)
  for n in np.geomspace(1e6, 1e9, 4):
    for d in np.geomspace(1e8, 1e11, 4):
      _write_point(out, "yan", n, d, noise=0.01 * rng.standard_normal())
  for c in (1e17, 1e18, 1e19):
    for k in (0.5, 2.0):
      n = k * 1e6 * (c / 1e17) ** 0.5
      _write_point(out, "yan", n, c / (6 * n), budget=c, noise=0.01 * rng.standard_normal())
  assert sweep_cli.main(["fit", "--out", str(out), "--bootstrap", "5"]) == 0
  printed = capsys.readouterr().out
  assert "approach 2: not fitted: approach 2 needs at least 2 FLOP budgets with 3+ sizes each" in printed
  fits = json.loads((out / "fits/fit.json").read_text())["yan"]
  assert fits["approach2"] is None and "C=1e+17: 2 sizes" in fits["approach2_refused"]
  assert fits["runs"] == 22 and all(hi > lo for lo, hi in fits["approach3"]["ci"].values())
  assert len((out / "results.jsonl").read_text().splitlines()) == 22
