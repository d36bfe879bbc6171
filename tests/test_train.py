"""Trainer: sharded == single device, FSDP placement, kill/resume bitwise, SIGTERM, corrupt checkpoints,
config errors."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from yanjax.core.cli import PREEMPTED_EXIT_CODE
from yanjax.core.config import ConfigError, load_config_file
from yanjax.training import sharding
from yanjax.training.train_step import eval_scalars, with_target_bytes
from yanjax.training.trainer import build_trainer

REPO = pathlib.Path(__file__).resolve().parent.parent
MODEL = dict(vocab_size=512, width=32, channels=2, mlp_width=64, layers=2)


def tiny_flags(store, steps=12, shared_cache=True, **train):
  """The flags of a tiny run on `store`; `shared_cache`: compile through the test session's compilation cache
  (tests/conftest.py) instead of the run's own `{workdir}/compilation_cache`."""
  flags = [f"--config={REPO / 'configs/yan_tiny.py'}", f"--config.data.stores=('{store}',)",
           "--config.data.prepare_default=False", f"--config.train.steps={steps}", "--config.train.global_batch=8",
           "--config.train.seq_len=32", "--config.train.log_every=1", "--config.train.eval_every=6",
           "--config.train.eval_batches=1", "--config.train.sample_tokens=0", "--config.optimizer.warmup_steps=2",
           "--config.checkpoint.every_steps=4"]
  flags += [f"--config.model.{k}={v}" for k, v in MODEL.items()]
  if shared_cache and os.environ.get("YANJAX_TEST_COMPILATION_CACHE"):
    flags.append(f"--config.train.compilation_cache={os.environ['YANJAX_TEST_COMPILATION_CACHE']}")
  return flags + [f"--config.train.{k}={v}" for k, v in train.items()]


def start_train(workdir, flags, **kwargs):
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  return subprocess.Popen([sys.executable, "-m", "yanjax.main.train", f"--workdir={workdir}", *flags], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def run_train(workdir, flags, timeout=300):
  proc = start_train(workdir, flags)
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def losses(workdir) -> dict[int, float]:
  """Step -> training loss, the last record of each step (a resumed run rewrites the steps it redoes)."""
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "loss" in record:
      out[record["step"]] = record["loss"]
  return out


def final_params(workdir):
  from yanjax.inference.loading import load_inference_model  # pylint: disable=import-outside-toplevel
  model, _, _ = load_inference_model(workdir)
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ---- in-process: placement and sharded equivalence -------------------------------------------------------

def _setup(mesh_cfg, model=None, grad_accum=1, loss_chunk=None):
  """(a new train state, the trainer) of yan_tiny with `model`, on the first devices that fill `mesh_cfg`."""
  cfg = load_config_file(REPO / "configs/yan_tiny.py")
  cfg.model.update(model or MODEL)
  cfg.mesh.update(mesh_cfg)
  cfg.train.grad_accum = grad_accum
  if loss_chunk is not None:
    cfg.train.loss_chunk = loss_chunk
  trainer = build_trainer(cfg, jax.devices()[:int(np.prod(list(cfg.mesh.values())))])
  return trainer.init(), trainer


def _batch(seed, b=8, t=16):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 512, (b, t + 1), dtype=np.int32)
  segments = np.repeat(np.array([[1] * 9 + [2] * 8]), b, 0)[:, :t].astype(np.int32)
  positions = np.concatenate([np.arange(9), np.arange(7)])[None].repeat(b, 0).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments, "positions": positions,
          "loss_mask": np.ones((b, t), np.float32)}


def test_fsdp_over_8_devices_holds_an_eighth_per_device():
  state, trainer = _setup({"data": 1, "fsdp": 8}, model=dict(MODEL, width=64, mlp_width=128, channels=4))
  report = sharding.replication_report(state["params"], trainer.state_sharding["params"])
  print(report)
  assert trainer.mesh.shape["fsdp"] == 8
  assert 1 / 8 <= report["fraction_per_device"] < 1 / 8 * 1.1
  embedding = state["params"]["embed"]["embedding"]
  assert embedding.addressable_shards[0].data.shape == (512, 64 // 8)


@pytest.fixture(scope="module")
def single_device_run():
  """(the losses, the final parameters' leaves) of 3 steps of yan_tiny on one device, on batches 0, 1, 2."""
  state, single = _setup({"data": 1})
  assert state["params"]["embed"]["embedding"].sharding.device_set == set(jax.devices()[:1])
  losses = []
  for i in range(3):
    state, metrics = single.train_step(state, _batch(i))
    losses.append(float(metrics["loss"]))
  return losses, jax.tree.leaves(state["params"])


@pytest.mark.slow
def test_sharded_run_equals_single_device_run(single_device_run):
  """data=4 x fsdp=2 with 2 micro-batches, the loss in chunks of 5 positions (the single device's whole logits).
  fsdp with tensor parallelism: tests/test_sequence_parallel.py's trainer, with time split too."""
  single_losses, single_params = single_device_run
  state, trainer = _setup({"data": 4, "fsdp": 2}, grad_accum=2, loss_chunk=5)
  for i in range(3):
    state, metrics = trainer.train_step(state, _batch(i))
    print(i, single_losses[i], float(metrics["loss"]))
    np.testing.assert_allclose(float(metrics["loss"]), single_losses[i], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state["params"]), single_params):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


@pytest.mark.parametrize("dispatch,expert", [("dropless", 4), ("capacity", 2)])
@pytest.mark.slow
def test_selective_expert_parallel_step_equals_single_device_and_gathers_no_tokens(dispatch, expert):
  """Groups split over the mesh axis `expert` of 8 devices (token-slots travel by all-to-all) against one device: each
  dispatch on one split (both dispatches on both splits cost 80 s of compiling for little more)."""
  from test_dispatch import all_gathered_shapes  # pylint: disable=import-outside-toplevel
  model = dict(MODEL, router=True, groups=4, top_k=2, dispatch=dispatch, capacity_factor=1.0, explore_steps=2)
  single_state, single = _setup({"data": 1}, model=model)
  state, trainer = _setup({"data": 1, "fsdp": 8 // expert, "expert": expert}, model=model)
  batches = [_batch(i, t=12) for i in range(3)]  # t = 12: the only size with a factor 3 (parameters: powers of 2)
  step = trainer.train_step.lower(state, batches[0]).compile()  # the program checked is the one that runs
  gathered = all_gathered_shapes(step.as_text())
  print(dispatch, "expert", expert, "all-gathers in the compiled step:", gathered)
  assert not [s for s in gathered if any(n % 3 == 0 for n in s)], "token activations were all-gathered"
  for batch in batches:
    single_state, single_metrics = single.train_step(single_state, batch)
    state, metrics = step(state, batch)
    print(dispatch, "expert", expert, "loss", float(metrics["loss"]), "single", float(single_metrics["loss"]),
          "dropped", float(metrics.get("router_dropped", 0.0)))
    np.testing.assert_allclose(float(metrics["loss"]), float(single_metrics["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(single_state["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_validation_bits_per_byte_is_the_summed_loss_in_bits_over_the_targets_bytes():
  state, trainer = _setup({"data": 1}, loss_chunk=5)  # 16 positions: three chunks and a padded one
  batch = _batch(0)
  batch["loss_mask"][:, :3] = 0.0  # masked targets count neither loss nor bytes
  token_bytes = np.random.default_rng(1).integers(0, 5, 512).astype(np.int32)
  scalars = eval_scalars([jax.device_get(trainer.eval_step(state["params"], with_target_bytes(batch, token_bytes)))])
  logits, _ = nnx.jit(lambda m, b: m(b["inputs"], b["segment_ids"], b["positions"]))(
      nnx.merge(trainer.graphdef, state["params"]), batch)
  log_probs = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1))
  nll = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
  mask = batch["loss_mask"]
  expected = np.sum(nll * mask) / np.log(2) / np.sum(token_bytes[batch["targets"]] * mask)
  print(scalars, expected)
  np.testing.assert_allclose(scalars["val_bits_per_byte"], expected, rtol=1e-5)
  np.testing.assert_allclose(scalars["val_loss"], np.sum(nll * mask) / np.sum(mask), rtol=1e-5)
  correct = np.argmax(np.asarray(logits), -1) == batch["targets"]
  np.testing.assert_allclose(scalars["val_accuracy"], np.sum(correct * mask) / np.sum(mask), rtol=1e-6)


def test_the_chunked_loss_trains_as_the_whole_logits():
  """One train step with train.loss_chunk=5 over 16 positions (three chunks and a padded one) against the whole
  logits (0): the same loss, z-loss and gradient norm. (The validation above runs in chunks against the whole
  logits; test_sharded_run_equals_single_device_run runs the chunks sharded, and
  tests/test_sequence_parallel.py with the vocabulary split over tensor and the chunks within segments.)"""
  batch = _batch(0)
  batch["loss_mask"][:, :3] = 0.0
  runs = []
  for loss_chunk in (0, 5):
    state, trainer = _setup({"data": 1}, loss_chunk=loss_chunk)
    _, metrics = trainer.train_step(state, batch)
    runs.append({name: float(metrics[name]) for name in ("loss", "z_loss", "grad_norm")})
  print("whole logits:", runs[0], "chunks of 5:", runs[1])
  for name, value in runs[0].items():
    np.testing.assert_allclose(runs[1][name], value, rtol=1e-5, err_msg=name)


def test_activations_are_constrained_by_the_rules():
  state, trainer = _setup({"data": 2, "fsdp": 2, "tensor": 2})
  text = trainer.train_step.lower(state, _batch(0)).as_text()
  constraints = text.count("sharding_constraint") + text.count("@Sharding")
  print("activation constraints in the lowered step:", constraints)
  assert constraints >= 2 * MODEL["layers"] + 2  # embedding, each layer's output, logits (x grad_accum scan)


def test_mesh_and_batch_errors_are_clear():
  with pytest.raises(ConfigError, match="needs 6 devices but 8"):
    sharding.make_mesh({"data": 3, "fsdp": 2, "tensor": 1, "expert": 1})
  with pytest.raises(ConfigError, match="do not divide"):
    sharding.make_mesh({"data": -1, "fsdp": 3, "tensor": 1, "expert": 1})
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1, "expert": 1})
  with pytest.raises(ConfigError, match="global_batch=12"):
    sharding.check_batch_divides(12, 1, 16, mesh, {"batch": ("data",)})


def test_unknown_and_invalid_config_keys_are_rejected(small_store, tmp_path):
  cfg = load_config_file(REPO / "configs/yan_tiny.py")
  with pytest.raises(AttributeError):
    cfg.train.stepz = 3  # locked ConfigDict
  code, _, err = run_train(tmp_path / "w", tiny_flags(small_store) + ["--config.train.stepz=3"])
  assert code != 0 and "stepz" in err
  code, _, err = run_train(tmp_path / "w", tiny_flags(small_store) + ["--config.model.channels=5"])
  assert code != 0 and "model.channels=5" in err


# ---- end to end through the command line ---------------------------------------------------------------

def test_sigkill_then_resume_equals_uninterrupted_run(small_store, tmp_path):
  flags = tiny_flags(small_store, steps=40, eval_every=100) + ["--config.checkpoint.every_steps=8"]
  code, out, err = run_train(tmp_path / "straight", flags)
  assert code == 0, err[-3000:]
  proc = start_train(tmp_path / "killed", flags)
  deadline = time.time() + 240
  while not (tmp_path / "killed/checkpoints/8").exists():
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "killed/checkpoints/40").exists(), "the run finished before it could be killed"
  code, out, err = run_train(tmp_path / "killed", flags)
  assert code == 0, err[-3000:]
  assert "resumed from the checkpoint at step" in out
  straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "killed")
  assert sorted(straight) == sorted(resumed) == list(range(1, 41))
  assert straight == resumed  # bitwise: every step's loss
  a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "killed")
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_saves_and_exits_with_requeue_code(small_store, tmp_path):
  proc = start_train(tmp_path / "w", tiny_flags(small_store, steps=100000, eval_every=100000) +
                     ["--config.checkpoint.every_steps=100000"])
  deadline = time.time() + 240
  while not (tmp_path / "w/metrics.jsonl").exists() or len((tmp_path / "w/metrics.jsonl").read_text().splitlines()) < 3:
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
  steps = sorted(int(p.name) for p in (tmp_path / "w/checkpoints").iterdir() if p.name.isdigit())
  assert len(steps) == 1 and 3 <= steps[0] < 100000


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(small_store, tmp_path):
  workdir = tmp_path / "w"
  code, _, err = run_train(workdir, tiny_flags(small_store, steps=12))
  assert code == 0, err[-3000:]
  for path in (workdir / "checkpoints/12/state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"corrupt")
  code, out, err = run_train(workdir, tiny_flags(small_store, steps=16))
  assert code == 0, err[-3000:]
  assert "checkpoint at step 12 is unreadable" in err
  assert "resumed from the checkpoint at step 8" in out


@pytest.mark.slow
def test_resume_with_changed_parameter_shapes_is_refused(small_store, tmp_path):
  workdir = tmp_path / "w"
  code, _, err = run_train(workdir, tiny_flags(small_store, steps=4))
  assert code == 0, err[-3000:]
  code, out, err = run_train(workdir, tiny_flags(small_store, steps=8) + ["--config.model.mlp_width=96"])
  assert code == 2 and "parameter shapes differ" in err and "ffn.gate_up" in err
  assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
  assert "train:" not in err  # refused before the loop (and its compile) started


@pytest.mark.slow
def test_two_processes_of_two_devices_equal_one_process_of_four(small_store, tmp_path):
  """Same losses within 1e-5 (relative): only the reduction order across devices may differ; and the in-loop
  evaluation (passkey) runs on the parameters sharded over both processes and scores the same."""
  sys.path.insert(0, str(REPO / "launch"))
  import local  # pylint: disable=import-outside-toplevel
  flags = tiny_flags(small_store, steps=6, eval_every=3) + [
      "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.evaluate.every=6",
      "--config.evaluate.tasks=('passkey',)", "--config.evaluate.passkey_contexts=(256,)",
      "--config.evaluate.passkey_depths=(0.5,)", "--config.evaluate.passkey_trials=1"]
  command = [sys.executable, "-m", "yanjax.main.train", f"--workdir={tmp_path / 'two'}", *flags]
  codes = local.launch_local(command, num_processes=2, devices_per_process=2, log_dir=str(tmp_path / "logs"),
                             timeout=400)
  assert codes == [0, 0], (tmp_path / "logs/process_1.log").read_text()[-3000:]
  code, _, err = run_train(tmp_path / "one", flags + ["--local_device_count=4"])
  assert code == 0, err[-3000:]
  two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
  print("2x2:", two, "\n1x4:", one)
  assert sorted(two) == sorted(one) == list(range(1, 7))
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)
  scores = [_task_scores(tmp_path / run) for run in ("two", "one")]
  print("task scores 2x2, 1x4:", scores)
  assert scores[0].keys() == scores[1].keys() == {"passkey/accuracy@256", "passkey/needle_gain@256"}
  np.testing.assert_allclose([scores[0][k] for k in sorted(scores[0])], [scores[1][k] for k in sorted(scores[0])],
                             rtol=1e-4, atol=1e-4)


def _task_scores(workdir) -> dict[str, float]:
  """The in-loop evaluation's scores of a run's metrics.jsonl (one evaluation)."""
  records = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  [record] = [r for r in records if any(k.startswith(("passkey/", "lm_eval/")) for k in r)]
  return {k: v for k, v in record.items() if k.startswith(("passkey/", "lm_eval/"))}
