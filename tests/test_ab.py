"""The A/B benchmark (benchmarks/ab.py, ab_report.py): its report's arithmetic on known curves, one tiny run end
to end (records, report, figures, re-run skipping), and its one-line refusals."""

import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import ab  # noqa: E402
import ab_report  # noqa: E402


def _run(losses, tokens_per_step=100, seconds_per_step=0.5, **fields):
  curve = [{"step": s, "tokens": s * tokens_per_step, "flops": s * tokens_per_step * 10.0,
            "seconds": s * seconds_per_step, "val_loss": loss, "val_accuracy": 0.1}
           for s, loss in zip(range(10, 10 * len(losses) + 1, 10), losses)]
  return {"curve": curve, **fields}


def test_reach_interpolates_the_first_crossing_and_says_when_never():
  run = _run([5.0, 4.0, 3.0, 3.5, 2.0])
  assert ab_report.reach(run, 3.5, "tokens") == pytest.approx(2500.0)  # halfway between steps 20 and 30
  assert ab_report.reach(run, 3.5, "seconds") == pytest.approx(12.5)
  assert ab_report.reach(run, 3.0, "tokens") == pytest.approx(3000.0)  # the first crossing, not the later one
  assert ab_report.reach(run, 6.0, "tokens") == 1000.0  # already below at the first evaluation
  assert np.isnan(ab_report.reach(run, 1.0, "tokens"))


def test_loss_at_equal_x_interpolates_in_log_x_and_refuses_to_extrapolate():
  run = _run([4.0, 3.0])
  assert ab_report.at(run, "tokens", np.sqrt(1000.0 * 2000.0)) == pytest.approx(3.5)
  assert np.isnan(ab_report.at(run, "tokens", 3000.0))


def test_cells_give_mean_and_seed_range_and_overlap_decides_significance():
  assert ab_report.cell([1.0, 3.0]) == "2.000 (1.000-3.000)"
  assert ab_report.cell([1.0, float("nan")]).endswith("(some seeds not reached)")
  assert ab_report.cell([float("nan")]) == "not reached"
  assert ab_report.separated([1.0, 1.1], [1.2, 1.3])
  assert not ab_report.separated([1.0, 1.25], [1.2, 1.3])


def _args(out, *extra):
  return ["--out", str(out), "--corpora", "stdlib", "--sizes", "w64", "--families", "mcsd,attention",
          "--seeds", "0", "--steps", "4", "--warmup_steps", "1", "--eval_every", "2", "--eval_batches", "1",
          "--contexts", "64,128", "--decode_repeats", "1", *extra]


@pytest.mark.slow
def test_tiny_ab_writes_records_report_and_figures_and_a_rerun_trains_nothing(tmp_path, capsys):
  out = tmp_path / "ab"
  assert ab.main(_args(out)) == 0
  runs = sorted((out / "runs").glob("*.json"))
  assert [p.name for p in runs] == ["stdlib-w64-attention-s0.json", "stdlib-w64-mcsd-s0.json"]
  record = json.loads(runs[1].read_text())
  assert [p["step"] for p in record["curve"]] == [2, 4]
  assert record["tokens"] == 4 * 16 * 128 and record["flops_per_token"] > 0
  assert 0 <= record["val_accuracy"] <= 1 and record["val_loss"] < np.log(2048) + 1
  assert 0 < record["val_bits_per_byte"] == record["curve"][-1]["val_bits_per_byte"]
  assert record["curve"][0]["seconds"] <= record["curve"][1]["seconds"] == record["train_seconds"]
  decode = [json.loads(line) for line in (out / "decode.jsonl").read_text().splitlines()]
  by_family = {(r["family"], r["context"]): r["state_bytes"] for r in decode}
  assert by_family[("mcsd", 64)] == by_family[("mcsd", 128)]  # O(1) state
  assert by_family[("attention", 128)] > by_family[("attention", 64)]  # a KV cache that grows
  report = (out / "report.md").read_text()
  assert "### stdlib, w64" in report and "| mcsd |" in report and "| attention |" in report
  assert "| val bits per byte |" in report and f"| {record['val_bits_per_byte']:.3f} (" in report
  assert (out / "ab_stdlib.png").stat().st_size > 0 and (out / "ab_decode.png").stat().st_size > 0
  assert len((out / "ab.jsonl").read_text().splitlines()) == len(runs) + len(decode)

  stamps = [p.stat().st_mtime_ns for p in runs]
  capsys.readouterr()
  assert ab.main(_args(out)) == 0  # finished runs are read back, not trained again
  assert [p.stat().st_mtime_ns for p in runs] == stamps
  assert ab.main(_args(out, "--eval_every", "4")) == 2  # other settings: refused, nothing touched
  error = capsys.readouterr().err
  assert error.count("\n") == 1 and "was trained with other settings" in error
  assert [p.stat().st_mtime_ns for p in runs] == stamps


@pytest.mark.parametrize("extra,message", [
    (["--families", "mcsd,rwkv"], "--families='mcsd,rwkv': choose from"),
    (["--steps", "4", "--warmup_steps", "30"], "optimizer.warmup_steps=30: must be in [0, train.steps=4)"),
    (["--seq_len", "3000"], "--seq_len=3000: must divide 2048, the tokens of every step"),
    (["--seeds", "0,a"], "--seeds='0,a': give integers, comma-separated"),
])
def test_bad_arguments_are_one_line_and_train_nothing(tmp_path, capsys, extra, message):
  assert ab.main(_args(tmp_path / "ab", *extra)) == 2
  error = capsys.readouterr().err
  assert error.count("\n") == 1 and message in error
  assert not (tmp_path / "ab" / "runs").exists()


def test_a_missing_corpus_says_how_to_get_it(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(ab.CORPORA, "pydocs", ab.Corpus((str(tmp_path / "absent"),), "install python3.11-doc"))
  assert ab.main(_args(tmp_path / "ab", "--corpora", "pydocs")) == 2
  error = capsys.readouterr().err
  assert error.count("\n") == 1 and "absent, which does not exist: install python3.11-doc" in error


def test_a_difference_over_one_seed_claims_no_range():
  runs = [_run([5.0, 4.0], corpus="c", size="w64", family=family, seed=0, val_loss=loss, val_accuracy=0.1,
               params=1, active_params=1, steps=20, tokens=2000, tokens_per_s=1.0, settings={"seq_len": 128})
          for family, loss in (("mcsd", 4.0), ("attention", 3.5))]
  table = "\n".join(ab_report.tables(runs))
  assert "-0.500 (one seed: no range)" in table and "beyond" not in table
  assert table.count("| n/a |") == 2  # records from before bits per byte was measured
