"""Router quality in a real run: the tiny selective model on standard-library text balances its groups after
its exploration phase, and the evaluation records say so per layer."""

import json
import os

import pytest
from test_train import REPO, run_train

GROUPS = 16
MAX_SHARE = 2.5 / GROUPS  # no group takes more than 2.5x its uniform share of the token-slots
# Measured (this test's print): at step 80 the busiest group of a layer still held 0.22 of the slots and two
# groups none (half the slots dropped); by step 200 the load-balancing loss brings the busiest to ~0.13-0.14.


@pytest.mark.slow
def test_tiny_selective_model_balances_its_groups_after_exploration(small_store, tmp_path, monkeypatch):
  # A training outcome depends on every rounding of the 200 steps: the run is compiled as a user's is, with
  # XLA's optimisation on (tests/conftest.py turns it off for the rest of the suite).
  monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"].replace("--xla_backend_optimization_level=0", ""))
  flags = [f"--config={REPO / 'configs/yan_tiny.py'}:selective", f"--config.data.stores=('{small_store}',)",
           "--config.data.prepare_default=False", "--config.model.vocab_size=512", "--config.model.explore_steps=30",
           "--config.train.steps=200", "--config.train.global_batch=8", "--config.train.seq_len=64",
           "--config.train.eval_every=100", "--config.train.eval_batches=2", "--config.train.sample_tokens=0",
           "--config.checkpoint.every_steps=200"]
  code, _, err = run_train(tmp_path / "run", flags, timeout=600)
  assert code == 0, err[-3000:]
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in records if "val_loss" in r]
  assert [r["step"] for r in evals] == [100, 200]
  final = evals[-1]
  for layer in range(2):
    load = [final[f"router/layer{layer}/load_group{e}"] for e in range(GROUPS)]
    print(f"layer {layer} at step 200: load per group {[round(v, 3) for v in load]}, "
          f"dropped {final[f'router/layer{layer}/dropped']:.3f}, entropy {final[f'router/layer{layer}/entropy']:.3f}")
    assert sum(load) == pytest.approx(1.0, abs=1e-4)
    assert final[f"router/layer{layer}/max_load"] >= max(load) - 1e-6  # each batch's, averaged: >= the mean's max
    assert final[f"router/layer{layer}/explore"] == 0.0  # validation never explores
    assert max(load) <= MAX_SHARE
    assert 0.0 <= final[f"router/layer{layer}/dropped"] < 0.3  # capacity factor 1.25, rows of 64 tokens
    assert final[f"router/layer{layer}/entropy"] > 0.0
  trained = [r for r in records if "loss" in r and r["step"] > 30]
  assert all(r["router_explore"] == 0.0 for r in trained)  # past the exploration phase
