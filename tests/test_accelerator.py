"""The prepared accelerator benchmark's plumbing (benchmarks/accelerator.sh, accelerator.py) without running a
benchmark: the script parses and refuses bad flags in one line, a step's record files its lines and failures, the
summary states the issue's three goals from known rows, and benchmarks/train.py's --set override. Milliseconds:
the GPU run and `--smoke` (minutes) are not part of the suite."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import accelerator  # noqa: E402
import train  # noqa: E402

from yanjax.core.config import load_config_file  # noqa: E402


def test_the_script_parses_prints_its_help_and_refuses_an_unknown_flag_in_one_line():
  script = str(ROOT / "benchmarks/accelerator.sh")
  assert subprocess.run(["bash", "-n", script], check=False).returncode == 0
  shown = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, check=False)
  assert shown.returncode == 0 and "Usage: bash benchmarks/accelerator.sh [--smoke]" in shown.stdout
  refused = subprocess.run(["bash", script, "--nope"], capture_output=True, text=True, check=False)
  assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "'--nope'" in refused.stderr


def _lines(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_record_files_the_steps_lines_and_a_failure_with_its_error_line(tmp_path):
  (tmp_path / "logs").mkdir()
  (tmp_path / "logs/mixer-a.out").write_text('note\n{"mixer": "mcsd", "ms": 1.0}\n')
  (tmp_path / "logs/mixer-b.log").write_text("Traceback\nValueError: no kernel\n----\nFor simplicity, JAX ...\n")
  accelerator.record(tmp_path, "mixer-a", "mixer", "0", 2.0, 40, {"form": "a"})
  accelerator.record(tmp_path, "mixer-b", "mixer", "1", 3.0, 40, {"form": "b"})
  accelerator.record(tmp_path, "mixer-c", "mixer", "124", 40.0, 40, {"form": "c"})
  accelerator.record(tmp_path, "decode", "decode", "skipped", 0.0, 3, {})
  rows = _lines(tmp_path / "mixer.jsonl")
  assert rows[0] == {"mixer": "mcsd", "ms": 1.0}
  assert rows[1] == {"bench": "mixer", "step": "mixer-b", "form": "b", "status": "failed", "rc": 1,
                     "error": "ValueError: no kernel"}
  assert rows[2]["status"] == "timeout" and rows[2]["error"].startswith("timed out after 40 s")
  assert _lines(tmp_path / "decode.jsonl")[0]["status"] == "skipped"
  assert [(s["step"], s["status"], s["rows"]) for s in _lines(tmp_path / "steps.jsonl")] == [
      ("mixer-a", "ok", 1), ("mixer-b", "failed", 0), ("mixer-c", "timeout", 0), ("decode", "skipped", 0)]


def _train_row(variant, tokens_per_s, mfu, recurrence=None, kernel=None, seq_len=8192):
  return {"config": "configs/yan_1p6b.py", "variant": variant, "recurrence": recurrence, "seq_len": seq_len,
          "attention_kernel": kernel, "tokens_per_s": tokens_per_s, "mfu": mfu, "device": "NVIDIA H100 80GB HBM3",
          "settings": []}


def test_the_goals_are_met_missed_by_how_much_or_unmeasured():
  rows = [_train_row("mcsd", 30000.0, 0.40, "auto"), _train_row("mcsd", 36000.0, 0.48, "pallas"),
          _train_row("attention", 20000.0, 0.30, kernel="cudnn"), _train_row("selective", 27000.0, 0.20)]
  selective = [{"ratio": "capacity/dense tokens_per_s", "seq_len": 4096, "value": 1.1}]
  goals = accelerator.goals(rows, selective)
  print("\n".join(goals))
  assert goals[1].endswith("met (0.480 >= 0.45; best of 2 MCSD rows: pallas at 8192 tokens on NVIDIA H100 80GB HBM3)")
  assert "met (1.800 >= 1.5; MCSD pallas over attention (cudnn) at 8192 tokens)" in goals[2]
  assert "missed by 0.100 (0.900 < 1.0" in goals[3] and "met (1.100 >= 1.0" in goals[4]
  xla = accelerator.goals([rows[0], _train_row("attention", 10000.0, 0.2, kernel="xla")], [])
  assert "unmeasured (attention did not run cuDNN's flash kernel" in xla[2] and "3.000" in xla[2]
  assert accelerator.goals([], [])[1].endswith("unmeasured (no MCSD row with an MFU: the step failed, or the "
                                               "device's peak is unknown)")


def test_train_benchmark_set_overrides_a_key_and_refuses_unknown_keys_and_wrong_types():
  cfg = load_config_file(ROOT / "configs/yan_tiny.py")
  train.override(cfg, "model.layers=4")
  train.override(cfg, "model.attention_kernel=xla")
  assert cfg.model.layers == 4 and cfg.model.attention_kernel == "xla"
  for setting, message in (("model.nope=1", "model has no key 'nope'"), ("nope.layers=1", "no section 'nope'"),
                           ("model.layers=x", "cannot be casted"), ("model.layers", "expected KEY=VALUE")):
    with pytest.raises(ValueError, match=message):
      train.override(cfg, setting)
