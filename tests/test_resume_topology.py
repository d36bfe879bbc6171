"""Resume on another topology: a run checkpointed on 8 devices (fsdp=8) continues on 4 devices, on an 8-device
data=2 x fsdp=2 x sequence=2 layout (each sequence's time split over 2 devices), and on 2 processes x 2 devices
with time split across the processes (sequence=2 x tensor=2), with the losses of the uninterrupted run; the
sequence-parallel runs then sample and export like any other.

Every batch is a function of (seed, step), so the resumed run sees the batches the original would have seen;
only the reduction order across devices differs, hence a float tolerance (relative 2e-5) rather than bitwise.
"""

import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from test_train import REPO, losses, run_train, tiny_flags

from yanjax.training import sharding
from yanjax.training.checkpointing import Checkpointer

STEPS, SAVED = 12, 6


def _mesh(axes: dict[str, int], devices) -> jax.sharding.Mesh:
  return sharding.make_mesh(axes, devices)


def test_checkpoint_restores_straight_into_another_mesh(tmp_path):
  """A state saved sharded over 8 devices restores onto a 4-device mesh in the new shardings, values equal."""
  values = np.arange(64 * 16, dtype=np.float32).reshape(64, 16)
  eight = _mesh({"fsdp": 8}, jax.devices()[:8])
  saved = {"w": jax.device_put(values, NamedSharding(eight, PartitionSpec("fsdp", None))),
           "step": jnp.asarray(3, jnp.int32)}
  checkpointer = Checkpointer(tmp_path / "w", async_save=False)
  checkpointer.save(3, saved, {"config": {}})
  checkpointer.close()

  four = _mesh({"data": 2, "tensor": 2}, jax.devices()[4:8])
  target = {"w": NamedSharding(four, PartitionSpec("tensor", "data")), "step": NamedSharding(four, PartitionSpec())}
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=target[k]) for k, v in saved.items()}
  step, state, _ = Checkpointer(tmp_path / "w").restore_latest(abstract)
  assert step == 3
  assert state["w"].sharding == target["w"]
  assert {d.id for d in state["w"].sharding.device_set} == {d.id for d in jax.devices()[4:8]}
  assert state["w"].addressable_shards[0].data.shape == (32, 8)
  np.testing.assert_array_equal(np.asarray(state["w"]), values)


@pytest.fixture(scope="module")
def eight_device_run(small_store, tmp_path_factory):
  """(flags, workdir) of an uninterrupted 12-step run on 8 devices with fsdp=8, checkpointed at 6 and 12."""
  workdir = tmp_path_factory.mktemp("topology") / "fsdp8"
  flags = tiny_flags(small_store, steps=STEPS, eval_every=100) + [f"--config.checkpoint.every_steps={SAVED}"]
  code, _, err = run_train(workdir, flags + ["--local_device_count=8", "--config.mesh.data=1",
                                             "--config.mesh.fsdp=8"])
  assert code == 0, err[-3000:]
  return flags, workdir


def _from_step_six(source, target):
  """A copy of `source`'s workdir as it was at step 6: the checkpoint of step 12 removed."""
  shutil.copytree(source, target)
  shutil.rmtree(target / "checkpoints" / str(STEPS))
  return target


def _assert_same_losses(reference, resumed):
  ref, res = losses(reference), losses(resumed)
  print("fsdp=8:", ref, "\nresumed:", res)
  assert sorted(res) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([res[s] for s in range(SAVED + 1, STEPS + 1)],
                             [ref[s] for s in range(SAVED + 1, STEPS + 1)], rtol=2e-5)


def _resume(reference, workdir, flags, devices, mesh) -> str:
  """Resumes the copy at step 6 of `reference` in `workdir` on `devices` laid out as `mesh`: -> its stdout."""
  code, out, err = run_train(_from_step_six(reference, workdir), flags + [f"--local_device_count={devices}"] +
                             [f"--config.mesh.{k}={v}" for k, v in mesh.items()])
  assert code == 0, err[-3000:]
  assert f"resumed from the checkpoint at step {SAVED}" in out and "restored onto" in out
  _assert_same_losses(reference, workdir)
  return out


@pytest.mark.slow
def test_resume_on_fewer_devices_matches_the_uninterrupted_run(eight_device_run, tmp_path):
  flags, reference = eight_device_run
  _resume(reference, tmp_path / "resumed", flags, 4, {"data": 1, "fsdp": 4})


@pytest.mark.slow
def test_resume_with_time_split_matches_the_uninterrupted_run_then_samples_and_exports(eight_device_run, tmp_path):
  """fsdp=8 -> data=2 x fsdp=2 x sequence=2: each 32-token sequence on 2 devices from step 7 on. Decoding (the
  end-of-run sample) and the export read the run as any other: the exported model's logits are the JAX model's."""
  from yanjax.export.writer import export_model  # pylint: disable=import-outside-toplevel
  from yanjax.inference.loading import load_inference_model  # pylint: disable=import-outside-toplevel
  from yanjax.numpy_runtime import Model, load_export  # pylint: disable=import-outside-toplevel
  flags, reference = eight_device_run
  workdir = tmp_path / "resumed"
  out = _resume(reference, workdir, flags + ["--config.train.sample_tokens=8"], 8,
                {"data": 2, "fsdp": 2, "sequence": 2})
  assert "sequence parallel: each sequence's 32 positions over 2 devices" in out
  assert (workdir / "sample.txt").read_text().startswith("def")
  model, cfg, _ = load_inference_model(workdir)  # on the run's own mesh, sequence axis included
  assert dict(model.embed.embedding[...].sharding.mesh.shape)["sequence"] == 2
  export_model(model, cfg, tmp_path / "export")
  tokens = np.arange(18, dtype=np.int32).reshape(2, 9) * 7 % cfg.vocab_size
  want = np.asarray(model(jnp.asarray(tokens))[0])
  got = Model(load_export(tmp_path / "export")).forward(tokens, np.ones_like(tokens),
                                                         np.broadcast_to(np.arange(9, dtype=np.int32), tokens.shape))
  print("exported vs JAX: max abs logit diff", np.max(np.abs(got - want)))
  np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.slow
def test_resume_on_two_processes_of_two_devices_splitting_time_across_them(eight_device_run, tmp_path):
  """The mesh's outer axis, sequence, spans the processes: both load the same rows, each device its positions."""
  sys.path.insert(0, str(REPO / "launch"))
  import local  # pylint: disable=import-outside-toplevel
  flags, reference = eight_device_run
  workdir = _from_step_six(reference, tmp_path / "resumed")
  command = [sys.executable, "-m", "yanjax.main.train", f"--workdir={workdir}", *flags, "--config.mesh.data=1",
             "--config.mesh.fsdp=1", "--config.mesh.sequence=2", "--config.mesh.tensor=2",
             "--config.train.sample_tokens=8"]
  codes = local.launch_local(command, num_processes=2, devices_per_process=2, log_dir=str(tmp_path / "logs"),
                             timeout=400)
  assert codes == [0, 0], (tmp_path / "logs/process_0.log").read_text()[-3000:]
  log = (tmp_path / "logs/process_0.log").read_text()
  assert f"resumed from the checkpoint at step {SAVED}" in log
  assert "sequence parallel: each sequence's 32 positions over 2 devices" in log
  _assert_same_losses(reference, workdir)
  assert (workdir / "sample.txt").read_text().startswith("def")  # generated on the sharded params, no gather
