"""The loop's hooks: intervals, the loss monitor's counters, and a run that profiles and logs to W&B."""

import json
import types

import jax
import ml_collections
import numpy as np
import pytest
from test_train import MODEL, REPO, losses, run_train, tiny_flags
from test_writers import wandb_history

from yanjax.core.config import load_config_file
from yanjax.training.hooks import LossMonitor, MetricsLogger
from yanjax.training.loop import TrainLoop
from yanjax.training.trainer import build_trainer
from yanjax.training.writers import JsonlWriter, Writers, wandb_run_id


def _counting_loop(steps=10, log_every=4):
  """A loop whose "train step" counts (no arrays), and the steps at which each added hook ran."""
  trainer = types.SimpleNamespace(to_global=lambda batch: batch, train_step=lambda state, _batch: (state + 1, {}))
  train_cfg = ml_collections.ConfigDict({"steps": steps, "log_every": log_every, "transfer_guard": True})
  loop, calls = TrainLoop(trainer, train_cfg), {}

  def add(name, **interval):
    loop.add_hook(lambda info: calls.setdefault(name, []).append(info.step), **interval)

  return loop, calls, add


def test_hooks_run_at_their_intervals_and_the_last_step():
  loop, calls, add = _counting_loop(steps=10, log_every=4)
  add("every3", every=3)
  add("seconds", seconds=1e-9)  # always overdue: runs at each sync (log) step, 4 and 8, and the last
  add("stop", at_stop=True)
  add("end", at_end=True)
  info = loop.run(0, 0, iter(range(100)))
  assert calls == {"every3": [3, 6, 9, 10], "seconds": [4, 8, 10], "end": [10]}
  assert info.state == 10 and info.exit_code == 0


def test_a_hook_stops_the_run_and_at_stop_hooks_run_on_that_step():
  loop, calls, add = _counting_loop(steps=10)

  def stop_at_5(info):
    if info.step == 5:
      info.stopping, info.exit_code = True, 42

  loop.add_hook(stop_at_5, every=1)
  add("save", every=4, at_stop=True)
  add("end", at_end=True)
  info = loop.run(2, 2, iter(range(100)))  # resumed at step 2
  assert calls == {"save": [4, 5], "end": [5]}
  assert (info.step, info.exit_code) == (5, 42)


def test_loss_monitor_counts_spikes_over_the_running_median():
  monitor = LossMonitor(window=4, factor=2.0)
  assert [monitor.update(loss, skipped=False) for loss in (9.0, 5.0, 4.0, 3.0)] == [None] * 4  # window not full
  assert monitor.update(8.0, skipped=False) is None  # median of 9, 5, 4, 3 is 4.5: 8 is below 2 x 4.5
  assert monitor.update(10.0, skipped=False) == 4.5  # median of 5, 4, 3, 8: a spike
  assert monitor.update(float("nan"), skipped=True) is None
  assert monitor.counters() == {"skipped_steps": 1, "loss_spikes": 1}
  resumed = LossMonitor(window=4, factor=2.0, **monitor.state())  # from a checkpoint's metadata
  assert resumed.update(25.0, skipped=False) == 6.0  # median of 4, 3, 8, 10
  assert resumed.counters() == {"skipped_steps": 1, "loss_spikes": 2}


@pytest.mark.slow
def test_a_skipped_step_is_counted(tmp_path):
  """Non-finite parameters make every step's loss NaN: each update is skipped and counted."""
  cfg = load_config_file(REPO / "configs/yan_tiny.py")
  cfg.model.update(MODEL)
  cfg.train.update(steps=3, global_batch=8, seq_len=16, log_every=1)
  cfg.optimizer.warmup_steps = 1
  trainer = build_trainer(cfg, jax.devices()[:1])
  state = trainer.init()
  state["params"] = jax.tree.map(lambda p: p * np.nan, state["params"])
  monitor = LossMonitor(cfg.train.spike_window, cfg.train.spike_factor)
  logger = MetricsLogger(Writers([JsonlWriter(tmp_path)]), cfg.train, trainer.model_cfg, 0, monitor)
  loop = TrainLoop(trainer, cfg.train)
  loop.add_hook(logger, every=1)
  loop.add_hook(logger.close, at_end=True)
  tokens = np.random.default_rng(0).integers(0, MODEL["vocab_size"], (8, 17), dtype=np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((8, 16), np.int32),
           "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)), "loss_mask": np.ones((8, 16), np.float32)}
  info = loop.run(state, 0, iter([batch] * 3))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["skipped"], r["skipped_steps"], r["loss_spikes"]) for r in records] == [
      (1, 1.0, 1.0, 0.0), (2, 1.0, 2.0, 0.0), (3, 1.0, 3.0, 0.0)]
  assert info.exit_code == 0 and int(info.state["step"]) == 3


@pytest.mark.slow
def test_a_run_writes_its_profile_window_and_its_offline_wandb_run(small_store, tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_DIR", str(tmp_path))
  workdir = tmp_path / "w"
  evaluation = ["--config.evaluate.every=6", f"--config.evaluate.tasks=('{REPO / 'configs/eval/python_syntax.yaml'}',)",
                "--config.evaluate.limit=8"]  # an lm-eval task in the loop, its scores through every writer
  code, out, err = run_train(workdir, tiny_flags(small_store, steps=6, profile_start_step=3, profile_steps=2,
                                                 wandb_project="yanjax-test", wandb_mode="offline") + evaluation)
  assert code == 0, err[-3000:]
  traces = list((workdir / "profile").rglob("*.xplane.pb"))
  print(out[-2000:], traces)
  assert traces and "profile of steps 3-4" in out
  (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{wandb_run_id(workdir)}")
  history = wandb_history(run_dir)
  assert {step: items["loss"] for step, items in history.items()} == losses(workdir)
  assert history[6]["val_loss"] > 0 and history[6]["skipped_steps"] == 0
  assert 0 < history[6]["val_bits_per_byte"] < history[6]["val_loss"] / np.log(2)  # > 1 byte per token
  assert 0 <= history[6]["lm_eval/python_syntax/acc"] <= 1 and history[6]["lm_eval/python_syntax/sample_len"] == 8
  assert "lm_eval/python_syntax/acc" in (workdir / "metrics.jsonl").read_text()
