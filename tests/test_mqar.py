"""MQAR (yanjax/eval/mqar.py): the batches' structure, purity and query placement, the accuracy on hand-made
logits, and the recall benchmark (benchmarks/recall.py): one tiny run end to end and its one-line refusals."""

import json
import pathlib
import sys

import numpy as np
import pytest

from yanjax.core.errors import UserError
from yanjax.eval import mqar

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import recall  # noqa: E402

TASK = dict(batch=8, seq_len=64, pairs=[2, 4, 8, 16], vocab_size=64)


def test_batch_has_the_trainers_format():
  batch = mqar.make_batch(0, 0, **TASK)
  assert sorted(batch) == ["inputs", "loss_mask", "positions", "segment_ids", "targets"]
  for name, array in batch.items():
    assert array.shape == (8, 64), name
    assert array.dtype == (np.float32 if name == "loss_mask" else np.int32), name
  assert (batch["segment_ids"] == 1).all() and (batch["positions"] == np.arange(64)).all()
  assert (batch["targets"][:, :-1] == batch["inputs"][:, 1:]).all()  # a row is an ordinary document
  assert batch["inputs"].min() >= 0 and batch["inputs"].max() < 64


def test_every_query_asks_for_the_value_paired_with_its_key_and_only_queries_count():
  batch = mqar.make_batch(3, 5, **TASK)
  for i, row in enumerate(batch["inputs"]):
    n = TASK["pairs"][i % 4]
    keys, values = row[0:2 * n:2], row[1:2 * n:2]
    assert len(set(keys)) == n and len(set(values)) == n
    assert keys.max() < 32 <= values.min()  # keys and values from disjoint halves of the vocabulary
    queries = np.flatnonzero(batch["loss_mask"][i])
    assert set(batch["loss_mask"][i]) == {0.0, 1.0} and len(queries) == n
    assert queries.min() >= 2 * n and ((queries - 2 * n) % 2 == 0).all()  # after the pairs, in two-token slots
    assert sorted(row[queries]) == sorted(keys)  # every key queried once
    paired = dict(zip(keys, values))
    assert [batch["targets"][i, q] for q in queries] == [paired[row[q]] for q in queries]


def test_a_batch_is_a_pure_function_of_seed_step_and_split():
  def same(a, b):
    return all((a[k] == b[k]).all() for k in a)

  assert same(mqar.make_batch(1, 7, **TASK), mqar.make_batch(1, 7, **TASK))
  assert not same(mqar.make_batch(1, 7, **TASK), mqar.make_batch(1, 8, **TASK))
  assert not same(mqar.make_batch(1, 7, **TASK), mqar.make_batch(2, 7, **TASK))
  assert not same(mqar.make_batch(1, 7, **TASK), mqar.make_batch(1, 7, split="eval", **TASK))


def test_zoologys_power_puts_queries_nearer_the_pairs_than_uniform():
  task = dict(batch=64, seq_len=256, pairs=[4], vocab_size=64)
  def mean_query_position(power):
    return np.mean(np.nonzero(mqar.make_batch(0, 0, power=power, **task)["loss_mask"])[1])
  print(mean_query_position(mqar.ZOOLOGY_POWER), mean_query_position(1.0))
  assert mean_query_position(mqar.ZOOLOGY_POWER) < 0.8 * mean_query_position(1.0)


@pytest.mark.parametrize("vocab_size,seq_len,pairs,message", [
    (64, 64, [17], "does not fit seq_len=64"), (16, 64, [9], "raise the vocabulary to >= 18"),
    (64, 64, [0], "must be >= 1"), (64, 64, [], "at least one pair count")])
def test_task_that_cannot_be_built_is_refused(vocab_size, seq_len, pairs, message):
  with pytest.raises(UserError, match=message):
    mqar.make_batch(0, 0, batch=2, seq_len=seq_len, pairs=pairs, vocab_size=vocab_size)


def test_accuracy_counts_the_argmax_at_query_positions_only():
  targets = np.array([[1, 2, 3, 4]], np.int32)
  batch = {"targets": targets, "loss_mask": np.array([[0, 1, 1, 0]], np.float32)}
  logits = np.zeros((1, 4, 5), np.float32)
  logits[0, 0, 0] = 1.0  # wrong, not a query: ignored
  logits[0, 1, 2] = 1.0  # right
  logits[0, 2, 4] = 1.0  # wrong
  logits[0, 3, 4] = 1.0  # right, not a query: ignored
  assert mqar.accuracy(logits, batch) == 0.5
  logits[0, 2, 3] = 2.0
  assert mqar.accuracy(logits, batch) == 1.0
  with pytest.raises(ValueError, match="no query positions"):
    mqar.accuracy(logits, {"targets": targets, "loss_mask": np.zeros((1, 4), np.float32)})


def _args(out, *extra):
  return ["--out", str(out), "--families", "mcsd,attention", "--widths", "16", "--seq_lens", "32",
          "--pairs", "2,4,16", "--vocab", "32", "--layers", "1", "--steps", "3", "--batch", "4",
          "--warmup_steps", "1", "--eval_every", "2", "--eval_batches", "1", *extra]


@pytest.mark.parametrize("extra,message", [
    (["--families", "mcsd,rnn"], "--families='mcsd,rnn': choose from"),
    (["--pairs", "16"], "none fits --seq_lens 32"),
    (["--vocab", "6"], "raise the vocabulary to >= 8"),
    (["--widths", "18"], "width 18 must be divisible by channels"),
    (["--steps", "0"], "--steps=0: must be >= 1"),
    (["--batch", "1"], "a batch mixes 2 pair counts")])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, extra, message):
  assert recall.main(_args(tmp_path / "recall", *extra)) == 2
  error = capsys.readouterr().err
  assert error.count("\n") == 1 and message in error, error
  assert not (tmp_path / "recall").exists()


@pytest.mark.slow
def test_tiny_recall_run_writes_lines_tables_and_figure_and_a_rerun_trains_nothing(tmp_path, capsys):
  out = tmp_path / "recall"
  args = _args(out, "--families", "mcsd")  # one family: compiling is most of the time (~8 s each)
  assert recall.main(args) == 0
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  assert [(r["family"], r["pairs"]) for r in printed] == [("mcsd", 2), ("mcsd", 4)]  # 16 pairs do not fit 32
  assert all(0 <= r["accuracy"] <= 1 and r["steps"] == 3 and r["seconds"] > 0 and r["width"] == 16
             and r["seq_len"] == 32 for r in printed)
  assert [json.loads(line) for line in (out / "recall.jsonl").read_text().splitlines()] == printed
  record = json.loads((out / "runs/mcsd-w16-t32-s0.json").read_text())
  assert [p["step"] for p in record["curve"]] == [2, 3] and record["train_pairs"] == [2, 4]
  report = (out / "recall.md").read_text()
  assert "### Sequence length 32" in report and "| 2 pairs | 4 pairs |" in report
  assert "| mcsd | 16 |" in report and "| (chance: one of the row's values at random) | | | 0.500 | 0.250 | |" in report
  assert "benchmarks/recall.py --out" in report
  assert (out / "recall.png").read_bytes()[:4] == b"\x89PNG"

  runs = sorted((out / "runs").glob("*.json"))
  stamps = [p.stat().st_mtime_ns for p in runs]
  assert recall.main(args) == 0  # finished runs are read back, not trained again
  assert [p.stat().st_mtime_ns for p in runs] == stamps
  capsys.readouterr()
  assert recall.main([*args, "--steps", "4"]) == 2  # other settings: refused
  assert "was trained with other settings" in capsys.readouterr().err
