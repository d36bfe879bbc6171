"""Resume on another topology: a run checkpointed on 8 devices (fsdp=8) continues on 4 devices, on 2 processes
x 2 devices, and on an 8-device data=2 x fsdp=2 x tensor=2 layout, with the losses of the uninterrupted run.

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
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **axes}, devices)


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


@pytest.mark.slow
@pytest.mark.parametrize("devices,mesh", [(4, {"data": 1, "fsdp": 4}),
                                          (8, {"data": 2, "fsdp": 2, "tensor": 2})])
def test_resume_on_other_devices_matches_the_uninterrupted_run(eight_device_run, tmp_path, devices, mesh):
  flags, reference = eight_device_run
  workdir = _from_step_six(reference, tmp_path / "resumed")
  code, out, err = run_train(workdir, flags + [f"--local_device_count={devices}"] +
                             [f"--config.mesh.{k}={v}" for k, v in mesh.items()])
  assert code == 0, err[-3000:]
  assert f"resumed from the checkpoint at step {SAVED}" in out and "restored onto" in out
  _assert_same_losses(reference, workdir)


@pytest.mark.slow
def test_resume_on_two_processes_of_two_devices(eight_device_run, tmp_path):
  sys.path.insert(0, str(REPO / "launch"))
  import local  # pylint: disable=import-outside-toplevel
  flags, reference = eight_device_run
  workdir = _from_step_six(reference, tmp_path / "resumed")
  command = [sys.executable, "-m", "yanjax.main.train", f"--workdir={workdir}", *flags, "--config.mesh.data=1",
             "--config.mesh.fsdp=4", "--config.train.sample_tokens=8"]
  codes = local.launch_local(command, num_processes=2, devices_per_process=2, log_dir=str(tmp_path / "logs"),
                             timeout=400)
  assert codes == [0, 0], (tmp_path / "logs/process_0.log").read_text()[-3000:]
  assert f"resumed from the checkpoint at step {SAVED}" in (tmp_path / "logs/process_0.log").read_text()
  _assert_same_losses(reference, workdir)
  assert (workdir / "sample.txt").read_text().startswith("def")  # generated on the sharded params, no gather
