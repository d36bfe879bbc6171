"""Inference from sharded checkpoints: a train state sharded over 8 devices restores straight onto a mesh
(the run's, the --mesh flag's, or FSDP over every device when the run's does not fit) with the saved values,
and generates what the single-device model generates; export streams one array at a time, its peak host
memory (tracemalloc) a fraction of the model's bytes, and the NumPy runtime runs the result."""

import json
import logging
import shutil
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tensorstore as ts
from flax import nnx
from jax.sharding import NamedSharding
from model_helpers import random_model

from yanjax.core.config import ConfigError
from yanjax.export import writer as export_module
from yanjax.export.writer import export_model, parameter_arrays
from yanjax.inference.generate import generate
from yanjax.inference.loading import inference_mesh, load_inference_model, parse_mesh
from yanjax.main import export as export_cli
from yanjax.main import generate as generate_cli
from yanjax.model.config import ModelConfig
from yanjax.model.lm import LanguageModel
from yanjax.numpy_runtime import Model, load_export
from yanjax.numpy_runtime import generate as np_generate
from yanjax.training import sharding
from yanjax.training.checkpointing import Checkpointer
from yanjax.training.optim import decay_mask, make_optimizer
from yanjax.training.run_config import build_run_config
from yanjax.training.train_state import train_state_shardings

PROMPTS = [[1, 5, 9, 3, 7], [1, 22], [4, 5, 6]]
FSDP8 = {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}


def _config(**changes):
  base = dict(pattern=("mcsd",), vocab_size=96, width=32, layers=2, channels=4, heads=2, mlp_width=64,
              max_decode_len=48)
  return ModelConfig(**{**base, **changes})


# The size-dependent run keys a checkpoint's saved config needs (the values do not matter here).
RUN = dict(train=dict(steps=10, global_batch=8, seq_len=32), optimizer=dict(lr=1e-3, warmup_steps=1),
           data=dict(stores=("unused",)), checkpoint=dict(every_steps=10))


def _key_name(path) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


def _param_values(model) -> dict[str, jax.Array]:
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {_key_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def write_checkpoint(workdir, model, step=1, mesh=None, saved_mesh=None):
  """Saves `model`'s parameters (+ optimizer state, step, rng) sharded over `mesh` (default FSDP over 8
  devices) with Checkpointer, as the trainer does; meta's run config claims `saved_mesh` if given."""
  run_cfg = build_run_config(model.cfg, mesh=mesh or FSDP8, **RUN)
  device_mesh = sharding.make_mesh(run_cfg.mesh)
  rules = {name: tuple(axes) for name, axes in run_cfg.rules}
  _, abstract = nnx.split(nnx.eval_shape(lambda: LanguageModel(model.cfg, rngs=nnx.Rngs(0))))
  optimizer = make_optimizer(run_cfg.optimizer, run_cfg.train.steps, decay_mask(abstract))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state = {"step": jnp.asarray(step, jnp.int32), "params": params, "opt_state": optimizer.init(params),
           "rng": jax.random.key_data(jax.random.PRNGKey(0))}
  state = jax.device_put(state, train_state_shardings(abstract, optimizer, rules, device_mesh))
  embedding = state["params"]["embed"]["embedding"]
  assert len(embedding.sharding.device_set) == 8 and not embedding.sharding.is_fully_replicated
  meta = {"step": step, "config": run_cfg.to_dict()}
  if saved_mesh is not None:
    meta["config"]["mesh"] = saved_mesh
  checkpointer = Checkpointer(str(workdir), async_save=False)
  checkpointer.save(step, state, meta)
  checkpointer.wait()
  checkpointer.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir of a checkpoint sharded over 8 devices, the single-device model it was saved from)."""
  model = random_model(_config())
  workdir = tmp_path_factory.mktemp("run")
  write_checkpoint(workdir, model)
  return workdir, model


def _check_restored(restored, original, fsdp, devices=None):
  want = _param_values(original)
  got = _param_values(restored)
  assert got.keys() == want.keys()
  for name, value in got.items():
    assert isinstance(value.sharding, NamedSharding), name
    assert dict(value.sharding.mesh.shape)["fsdp"] == fsdp, name
    np.testing.assert_array_equal(np.asarray(value), np.asarray(want[name]), err_msg=name)
  embedding = got["embed/embedding"]  # [V, D], D over fsdp: each device holds 1/fsdp of it
  assert len(embedding.sharding.device_set) == (devices or fsdp) and not embedding.sharding.is_fully_replicated
  assert {s.data.shape for s in embedding.addressable_shards} == {(96, 32 // fsdp)}


# ---- restore onto a mesh ----------------------------------------------------------------------------

def test_sharded_checkpoint_restores_onto_the_run_mesh_and_generates_the_same(run):
  workdir, original = run
  model, cfg, tokenizer = load_inference_model(workdir)
  assert cfg == original.cfg and tokenizer is None
  _check_restored(model, original, fsdp=8)
  sharded = generate(model, PROMPTS, max_new_tokens=10)
  alone = generate(original, PROMPTS, max_new_tokens=10)
  print([c.tokens for c in sharded])
  assert sharded == alone


def test_mesh_flag_picks_the_mesh(run):
  workdir, original = run
  model, _, _ = load_inference_model(workdir, mesh_spec="fsdp=4")  # half the devices
  _check_restored(model, original, fsdp=4)
  model, _, _ = load_inference_model(workdir, mesh_spec="data=2,fsdp=-1")  # -1: the remaining 4
  _check_restored(model, original, fsdp=4, devices=8)
  assert dict(_param_values(model)["embed/embedding"].sharding.mesh.shape)["data"] == 2
  with pytest.raises(ConfigError, match="needs 16 devices but 8 are present"):
    load_inference_model(workdir, mesh_spec="fsdp=16")


def test_parse_mesh_and_fallback_mesh():
  assert parse_mesh("data=1,fsdp=4") == {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 1, "expert": 1}
  assert parse_mesh("fsdp=-1, tensor=2") == {"data": 1, "fsdp": -1, "sequence": 1, "tensor": 2, "expert": 1}
  for bad, message in [("fsdp=x", "must be an integer"), ("pipeline=2", "unknown axis 'pipeline'"),
                       ("fsdp=0", "must be positive or -1"), ("data=-1,fsdp=-1", "at most one axis")]:
    with pytest.raises(ConfigError, match=message):
      parse_mesh(bad)
  devices = jax.devices()[:4]
  assert dict(inference_mesh({"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}, devices=devices).shape) == \
      {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 1, "expert": 1}  # trained on 8, loaded on 4: FSDP over the 4
  assert dict(inference_mesh({"data": -1, "fsdp": 2, "tensor": 1, "expert": 1}, devices=devices).shape) == \
      {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 1, "expert": 1}  # fits: the run's own mesh
  assert inference_mesh(None, devices=devices).devices.size == 4


def test_a_saved_mesh_that_does_not_fit_falls_back_to_fsdp_over_all_devices(tmp_path, caplog):
  model = random_model(_config())
  write_checkpoint(tmp_path, model, saved_mesh={"data": 1, "fsdp": 16, "tensor": 1, "expert": 1})
  with caplog.at_level(logging.WARNING):
    restored, _, _ = load_inference_model(tmp_path)
  assert "does not fit the 8 devices present" in caplog.text and "FSDP over all 8 devices" in caplog.text
  _check_restored(restored, model, fsdp=8)


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  older, newer = random_model(_config(), seed=1), random_model(_config(), seed=2)
  write_checkpoint(tmp_path, older, step=1)
  write_checkpoint(tmp_path, newer, step=2)
  restored, _, _ = load_inference_model(tmp_path)
  _check_restored(restored, newer, fsdp=8)
  shutil.rmtree(tmp_path / "checkpoints" / "2" / "state")
  with caplog.at_level(logging.WARNING):
    restored, _, _ = load_inference_model(tmp_path)
  assert "checkpoint at step 2 is unreadable" in caplog.text
  _check_restored(restored, older, fsdp=8)
  with pytest.raises(FileNotFoundError, match="no checkpoint under"):
    load_inference_model(tmp_path / "empty")


def _stored_value(state_dir, key: bytes):
  """(data file, offset, length) of `key`'s value in a checkpoint's OCDBT database (read with ts.ocdbt.dump)."""
  base = ts.KvStore.open({"driver": "file", "path": f"{state_dir}/"}).result()
  nodes = [ts.ocdbt.dump(base).result()["versions"][-1]["root"]["location"]]
  while nodes:
    for entry in ts.ocdbt.dump(base, nodes.pop()).result()["entries"]:
      if str(entry.get("location", "")).startswith("btreenode"):  # an interior node's child
        nodes.append(entry["location"])
      elif entry.get("key") == key:
        _, prefix, name, offset, length = entry["indirect_value"].split(":")
        return state_dir / prefix / name, int(offset), int(length)
  raise KeyError(key)


def test_a_damaged_newest_checkpoint_fails_its_checksums_and_falls_back(tmp_path, caplog):
  """One flipped byte in the newest checkpoint's data files, inside a chunk of the embedding: the parameters
  read back without error but differ from their saved checksums, so the previous step is used (with a
  warning). The chunk is located through the database's index: which data file holds the parameters varies
  from save to save."""
  older, newer = random_model(_config(), seed=1), random_model(_config(), seed=2)
  write_checkpoint(tmp_path, older, step=1)
  write_checkpoint(tmp_path, newer, step=2)
  path, offset, length = _stored_value(tmp_path / "checkpoints" / "2" / "state", b"params.embed.embedding/0.0")
  assert path.parent.name == "d"
  data = bytearray(path.read_bytes())
  data[offset + length // 2] ^= 0xFF
  path.write_bytes(bytes(data))
  with caplog.at_level(logging.WARNING):
    restored, _, _ = load_inference_model(tmp_path)
  assert "checkpoint at step 2 is unreadable" in caplog.text and "checksums differ" in caplog.text
  assert "['params']['embed']['embedding']" in caplog.text
  _check_restored(restored, older, fsdp=8)


def test_a_checkpoint_without_checksums_loads_as_before(tmp_path):
  model = random_model(_config())
  write_checkpoint(tmp_path, model)
  meta_file = tmp_path / "checkpoints" / "1" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  assert meta.pop("checksums")  # as a checkpoint written before checksums were recorded
  meta_file.write_text(json.dumps(meta))
  restored, _, _ = load_inference_model(tmp_path)
  _check_restored(restored, model, fsdp=8)


def test_a_run_in_a_bucket_restores_onto_the_mesh(s3_bucket, tmp_path):
  """A workdir at s3://...: its sharded checkpoint restores onto the mesh; its tokenizer comes back as an
  epath in the bucket, which yanjax.inference.generate reads."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  model = random_model(_config())
  workdir = f"{s3_bucket}/runs/tiny"
  write_checkpoint(workdir, model)
  (epath.Path(workdir) / "tokenizer.model").write_bytes(b"not read here")
  restored, cfg, tokenizer = load_inference_model(workdir, mesh_spec="fsdp=8")
  assert cfg == model.cfg and str(tokenizer) == f"{workdir}/tokenizer.model"
  _check_restored(restored, model, fsdp=8)
  assert generate(restored, PROMPTS[:1], max_new_tokens=4) == generate(model, PROMPTS[:1], max_new_tokens=4)
  with pytest.raises(FileNotFoundError, match="no checkpoint under s3://"):
    load_inference_model(f"{s3_bucket}/runs/none")


def test_clis_with_mesh_flag(run, tmp_path, capsys):
  workdir, original = run
  (want,) = generate(original, [PROMPTS[0]], max_new_tokens=6)
  generate_cli.main(["--workdir", str(workdir), "--mesh", "fsdp=2", "--prompt_ids", "1,5,9,3,7",
                        "--max_new_tokens", "6"])
  assert capsys.readouterr().out == "".join(f"{t} " for t in want.tokens) + f"\n[{want.stop_reason}]\n"
  export_cli.main(["--workdir", str(workdir), "--out", str(tmp_path / "export"), "--mesh", "fsdp=8"])
  assert "exported 16 arrays" in capsys.readouterr().out
  exported = load_export(tmp_path / "export").arrays
  for name, value in parameter_arrays(original, original.cfg).items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)


# ---- streaming export ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_streaming_export_of_a_many_layer_model_keeps_host_memory_far_below_the_model(tmp_path):
  """48 scanned layers of width 128 (~30 MB of float32), sharded over 8 devices: exporting holds one array
  (one layer's slice) on the host at a time."""
  cfg = _config(vocab_size=512, width=128, layers=48, channels=4, mlp_width=256, scan_layers=True,
                tie_embeddings=False)
  single = random_model(cfg, scale=0.1)
  graphdef, state = nnx.split(single)
  mesh = sharding.make_mesh(FSDP8)
  rules = {name: tuple(axes) for name, axes in build_run_config(cfg, mesh=FSDP8, **RUN).rules}
  _, abstract = nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))))
  model = nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(abstract, rules, mesh)))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  model_bytes = sum(x.nbytes for x in leaves)
  largest = max(4 * int(np.prod(shape)) for shape in
                (s.shape for s in export_module.parameter_sources(model, cfg).values()))
  assert all(len(x.sharding.device_set) == 8 for x in leaves)

  for weights_format in ("npz", "safetensors"):
    tracemalloc.start()
    try:
      manifest = export_model(model, cfg, tmp_path / weights_format, weights_format=weights_format)
      _, peak = tracemalloc.get_traced_memory()
    finally:
      tracemalloc.stop()
    print(f"streaming export ({weights_format}): peak traced host memory {peak / 2**20:.2f} MiB = "
          f"{100 * peak / model_bytes:.1f}% of the model's {model_bytes / 2**20:.2f} MiB "
          f"({len(manifest['arrays'])} arrays, largest {largest / 2**20:.2f} MiB)")
    assert peak < 0.35 * model_bytes

  export = load_export(tmp_path / "npz")
  st = safetensors.numpy.load_file(str(tmp_path / "safetensors" / "weights.safetensors"))
  stacked = np.asarray(single.blocks[0].ffn.gate_up[...])  # [layers, D, 2, F]: a pattern of one
  for i in (0, 17, 47):
    np.testing.assert_array_equal(export.arrays[f"blocks.{i}.ffn.gate_up"], stacked[i])
  for name, value in parameter_arrays(single, cfg).items():
    np.testing.assert_array_equal(export.arrays[name], value, err_msg=name)
    np.testing.assert_array_equal(st[name], value, err_msg=name)

  runtime = Model(export)
  tokens = np.array([[1, 5, 9, 3, 7, 11, 2, 40]])
  want = np.asarray(nnx.jit(lambda m, t: m(t)[0])(single, jnp.asarray(tokens)))
  got = runtime.forward(tokens)
  err = np.max(np.abs(got - want))
  print(f"48-layer export: numpy vs jax max abs logit diff {err:.2e} (logits up to {np.abs(want).max():.1f})")
  assert err < 1e-3
  (completion,) = np_generate(runtime, [tokens[0].tolist()], max_new_tokens=6)
  assert completion.tokens == generate(single, [tokens[0].tolist()], max_new_tokens=6)[0].tokens
