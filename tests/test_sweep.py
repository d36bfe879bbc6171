"""Sweep runner: a tiny real sweep on the default corpus runs end to end, skips finished points, fits and plots."""

import json
import pathlib

import pytest

from yanjax import sweep

REPO = pathlib.Path(__file__).resolve().parent.parent

SPEC = '''
def get_sweep():
  return dict(
      families={{"yan": "{repo}/configs/yan_tiny.py", "attention": "{repo}/configs/yan_tiny.py:attention"}},
      sizes={{"w16": dict(width=16, channels=2, mlp_width=48, layers=1),
             "w32": dict(width=32, channels=2, mlp_width=96, layers=1),
             "w48": dict(width=48, channels=3, mlp_width=144, layers=1)}},
      tokens=[4096, 8192],
      config=dict(train=dict(global_batch=4, seq_len=32, log_every=8, eval_batches=1),
                  optimizer=dict(warmup_steps=4),
                  data=dict(stores=("{store}",), validation_fraction=0.05)),
  )
'''


def test_spec_errors(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_sweep():\n  return dict(families={}, sizes={}, budgets=[1])\n")
  with pytest.raises(ValueError, match="budgets"):
    sweep.load_spec(bad)


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path, capsys):
  spec = tmp_path / "spec.py"
  spec.write_text(SPEC.format(repo=REPO, store=tmp_path / "stdlib"))
  out = tmp_path / "sweep"
  grid = sweep.points(sweep.load_spec(spec))
  assert len(grid) == 12 and {p.family for p in grid} == {"yan", "attention"}
  assert sweep.main(["run", "--spec", str(spec), "--out", str(out)]) == 0
  records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  assert len(records) == 12
  for r in records:
    assert r["params"] > 0 and r["tokens"] in (4096, 8192) and r["flops"] > 0 and 0 < r["val_loss"] < 10
  capsys.readouterr()
  assert sweep.main(["run", "--spec", str(spec), "--out", str(out)]) == 0  # finished points are skipped
  assert capsys.readouterr().out.count("done already, skipped") == 12
  assert sweep.main(["launch", "--spec", str(spec), "--out", str(out)]) == 0
  assert "#SBATCH --array=0-11" in (out / "sweep.sbatch").read_text()
  assert sweep.main(["fit", "--out", str(out), "--bootstrap", "5"]) == 0
  fits = json.loads((out / "fits/fit.json").read_text())
  assert set(fits) >= {"yan", "attention"} or set(fits.get("families", {})) >= {"yan", "attention"}
  for png in ("loss_vs_flops.png", "frontier.png"):
    assert (out / "fits" / png).stat().st_size > 10_000


@pytest.mark.slow
def test_failed_point_is_reported_and_the_rest_run(tmp_path, capsys):
  """The first point prepares the default corpus at vocabulary 2048; a 4096-vocabulary model then fails."""
  spec = tmp_path / "spec.py"
  spec.write_text(f'''
def get_sweep():
  return dict(
      families={{"yan": "{REPO}/configs/yan_tiny.py"}},
      sizes={{"ok": dict(width=16, channels=2, mlp_width=48, layers=1),
             "bad_vocab": dict(width=16, channels=2, mlp_width=48, layers=1, vocab_size=4096),
             "ok2": dict(width=24, channels=2, mlp_width=48, layers=1)}},
      tokens=[2048],
      config=dict(train=dict(global_batch=4, seq_len=32, eval_batches=1), optimizer=dict(warmup_steps=2),
                  data=dict(stores=("{tmp_path / 'stdlib'}",))),
  )
''')
  out = tmp_path / "sweep"
  assert sweep.main(["run", "--spec", str(spec), "--out", str(out)]) == 1
  printed = capsys.readouterr().out
  assert "yan-bad_vocab-D2.05e+03: FAILED" in printed and "failed: ['yan-bad_vocab-D2.05e+03']" in printed
  records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  assert sorted(r["size"] for r in records) == ["ok", "ok2"]  # the point after the failure ran too
