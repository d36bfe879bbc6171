"""Export and the NumPy runtime: stable names, manifest checksums, one weights file in the format asked for,
npz == safetensors == the model's parameters, bfloat16 bit patterns, NumPy logits equal to the JAX model's
within TOLERANCE (forward and recurrent decode, every config switch), greedy completions equal token for
token, and clear errors naming the file or array for missing, corrupt or mismatched exports."""

import json
import pathlib
import re
import shutil
import subprocess
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from model_helpers import random_model, small_config

from yanjax.export import writer as export_module
from yanjax.export.writer import export_model, parameter_arrays
from yanjax.inference import loading as inference
from yanjax.inference.generate import generate
from yanjax.main import export as export_cli
from yanjax.main import generate as generate_cli
from yanjax.numpy_runtime import (
  ExportError,
  Model,
  array_sha256,
  bf16_bits_to_float32,
  expected_shapes,
  float32_to_bf16_bits,
  load_export,
  read_safetensors,
)
from yanjax.numpy_runtime import format as fmt
from yanjax.numpy_runtime import generate as np_generate

# Max abs logit difference, NumPy runtime vs JAX model, float32 weights and compute (logits here are O(10)).
TOLERANCE = 1e-4

MODELS = {
    "yan": dict(pattern=("mcsd",)),
    "yan_sum_current_learned_rates": dict(pattern=("mcsd",), combine="sum", include_current=True, learnable_rates=True),
    "yan_scan_untied_learned_rates": dict(pattern=("mcsd",), scan_layers=True, tie_embeddings=False,
                                          learnable_rates=True, recurrence="chunked", chunk_size=4),
    "yan_selective_dropless": dict(pattern=("mcsd",), router=True, groups=4, top_k=2, dispatch="dropless"),
    "yan_dd_learned_rates": dict(pattern=("mcsd_dd",), learnable_rates=True, recurrence="associative"),
    "attention": dict(pattern=("attention",)),
    "attention_scan_untied": dict(pattern=("attention",), scan_layers=True, tie_embeddings=False),
    "hybrid_scan": dict(pattern=("mcsd", "swa"), layers=4, scan_layers=True, window=4),  # layer i = [i // 2, i % 2]
}


def _config(name, **changes):
  return small_config(**{**MODELS[name], **changes})


def _model(name, **changes):
  cfg = _config(name, **changes)
  return random_model(cfg), cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """name -> (model, cfg, export dir) for every model in MODELS (the default format, npz)."""
  out = {}
  for name in MODELS:
    model, cfg = _model(name)
    path = tmp_path_factory.mktemp(name)
    export_model(model, cfg, path)
    out[name] = (model, cfg, path)
  return out


@pytest.fixture(scope="module")
def exported_safetensors(exported, tmp_path_factory):
  """name -> export dir of the same models as `exported`, in the safetensors format."""
  out = {}
  for name, (model, cfg, _) in exported.items():
    out[name] = tmp_path_factory.mktemp(name + "_safetensors")
    export_model(model, cfg, out[name], weights_format="safetensors")
  return out


def _fresh_export(exported, tmp_path, name="yan"):
  path = tmp_path / "export"
  shutil.copytree(exported[name][2], path)
  return path


# ---- format -----------------------------------------------------------------------------------------

def test_export_writes_named_arrays_with_checksums(exported, exported_safetensors):
  model, cfg, path = exported["yan_selective_dropless"]
  st_path = exported_safetensors["yan_selective_dropless"]
  manifest = json.loads((path / "manifest.json").read_text())
  names = [a["name"] for a in manifest["arrays"]]
  assert names == list(expected_shapes(cfg.to_dict()))
  assert names[:4] == ["embed.embedding", "blocks.0.mixer_norm.scale", "blocks.0.mixer.proj",
                       "blocks.0.mixer.decay_norm.scale"]
  assert manifest["format_version"] == 3 and manifest["config"] == json.loads(json.dumps(cfg.to_dict()))
  assert json.loads((path / "config.json").read_text()) == manifest["config"]
  params = parameter_arrays(model, cfg)
  np.testing.assert_array_equal(params["blocks.1.ffn.router_in"], np.asarray(model.blocks[1].ffn.router_in[...]))
  npz = np.load(path / "weights.npz")
  st = safetensors.numpy.load_file(str(st_path / "weights.safetensors"))  # the reference reader
  ours = read_safetensors(st_path / "weights.safetensors")  # the runtime's pure-NumPy reader
  st_manifest = json.loads((st_path / "manifest.json").read_text())
  assert st_manifest["arrays"] == manifest["arrays"]  # the same names, shapes and checksums in either format
  for entry in manifest["arrays"]:
    n = entry["name"]
    for arrays in (npz, st, ours):
      assert arrays[n].dtype == np.float32 and list(arrays[n].shape) == entry["shape"], n
      np.testing.assert_array_equal(arrays[n], params[n], err_msg=n)
      assert array_sha256(arrays[n]) == entry["sha256"], n
  assert sorted(npz.files) == sorted(st) == sorted(names)


@pytest.mark.parametrize("weights_format", ["npz", "safetensors"])
def test_export_holds_exactly_the_requested_weights_file(exported, exported_safetensors, weights_format):
  path = exported["yan"][2] if weights_format == "npz" else exported_safetensors["yan"]
  weights, other = ("weights.npz", "safetensors") if weights_format == "npz" else ("weights.safetensors", "npz")
  assert sorted(p.name for p in path.iterdir()) == ["config.json", "manifest.json", weights]
  manifest = json.loads((path / "manifest.json").read_text())
  assert manifest["weights_format"] == weights_format and sorted(manifest["files"]) == ["config.json", weights]
  assert load_export(path).arrays.keys() == load_export(path, weights=weights_format).arrays.keys()
  message = f"{path}: holds {weights} only, not weights.{other}; export again with --format {other}"
  with pytest.raises(ExportError, match=f"^{re.escape(message)}$"):
    load_export(path, weights=other)
  with pytest.raises(ValueError, match="weights='pt': choose one of"):
    load_export(path, weights="pt")
  with pytest.raises(ValueError, match="weights_format='pt': choose one of"):
    export_model(*exported["yan"][:2], path.parent / "never", weights_format="pt")


@pytest.mark.parametrize("name", ["yan_scan_untied_learned_rates", "hybrid_scan"])
def test_scanned_layers_are_exported_per_layer_under_the_unscanned_names(exported, name):
  """Scanned, pattern position j is one module stacked over the repetitions r; layer r P + j is its slice r."""
  model, cfg, path = exported[name]
  unscanned = _config(name, scan_layers=False)
  arrays = load_export(path).arrays
  assert list(arrays) == list(expected_shapes(unscanned.to_dict()))
  period = len(cfg.pattern)
  for i in range(cfg.layers):
    stacked = np.asarray(model.blocks[i % period].mixer_norm.scale[...])  # [R, D]
    np.testing.assert_array_equal(arrays[f"blocks.{i}.mixer_norm.scale"], stacked[i // period])
    path_in_mixer, variable = next(iter(nnx.to_flat_state(nnx.state(model.blocks[i % period].mixer, nnx.Param))))
    np.testing.assert_array_equal(arrays[f"blocks.{i}.mixer.{'.'.join(map(str, path_in_mixer))}"],
                                  np.asarray(variable[...])[i // period])
  assert ("head" in arrays) == (not cfg.tie_embeddings)


# ---- the NumPy runtime against the JAX model ---------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_numpy_runtime_matches_jax(exported, exported_safetensors, name):
  model, cfg, path = exported[name]
  runtime = Model(load_export(path))
  forward = nnx.jit(lambda m, *a: m(*a)[0])  # every call below is [3, 17]: one compile
  tokens = jax.random.randint(jax.random.PRNGKey(2), (3, 17), 0, cfg.vocab_size)
  segment_ids = jnp.array([[1] * 6 + [2] * 11] + [[1] * 17] * 2)  # row 0 packs two documents
  positions = jnp.array([list(range(6)) + list(range(11))] + [list(range(17))] * 2)
  want = np.asarray(forward(model, tokens, segment_ids, positions))
  got = runtime.forward(np.asarray(tokens), np.asarray(segment_ids), np.asarray(positions))
  err_forward = np.max(np.abs(got - want))
  # The recurrent decode: prefill 5 tokens of row 1, then one token at a time, vs JAX's one pass.
  row = np.asarray(tokens[1:2])
  logits, state = runtime.prefill(row[:, :5], runtime.init_state(1))
  steps = [logits]
  for t in range(5, 17):
    logits, state = runtime.decode_step(state, row[:, t])
    steps.append(logits[:, None])
  err_decode = np.max(np.abs(np.concatenate(steps, 1) - want[1:2]))
  print(f"{name}: numpy vs jax max abs logit diff: forward {err_forward:.2e}, decode {err_decode:.2e} "
        f"(logits up to {np.abs(want).max():.1f})")
  assert err_forward < TOLERANCE and err_decode < TOLERANCE

  # Greedy generation: every NumPy token is the JAX model's argmax given the tokens before it.
  prompts = [[1, 5, 9, 3, 7], [1, 22], [4, 5, 6]]
  completions = [c.tokens for c in np_generate(runtime, prompts, max_new_tokens=12)]
  sequences = np.zeros((3, 17), np.int32)  # prompt + completion, zero-padded at the end (causal: harmless)
  for r, (p, c) in enumerate(zip(prompts, completions)):
    sequences[r, :len(p) + len(c)] = p + c
  argmax = np.argmax(np.asarray(forward(model, jnp.asarray(sequences), jnp.ones((3, 17), jnp.int32),
                                        jnp.broadcast_to(jnp.arange(17), (3, 17)))), -1)
  for r, (p, c) in enumerate(zip(prompts, completions)):
    assert len(c) == 12 and list(argmax[r, len(p) - 1:len(p) + 11]) == c, (name, r)
  if name in ("yan", "yan_selective_dropless", "attention"):  # and the JAX decode loop itself agrees
    assert [c.tokens for c in generate(model, prompts, max_new_tokens=12)] == completions
  from_safetensors = load_export(exported_safetensors[name]).arrays
  assert from_safetensors.keys() == runtime.w.keys()
  for n, value in from_safetensors.items():
    np.testing.assert_array_equal(value, runtime.w[n], err_msg=n)


def test_bfloat16_export_stores_bit_patterns_and_runs(exported, tmp_path):
  model, cfg, _ = exported["yan"]
  manifest = export_model(model, cfg, tmp_path / "npz", dtype="bfloat16")
  st_manifest = export_model(model, cfg, tmp_path / "st", dtype="bfloat16", weights_format="safetensors")
  assert manifest["weights_dtype"] == "bfloat16" and manifest["arrays"][0]["npz_dtype"] == "uint16"
  assert st_manifest["arrays"] == manifest["arrays"]
  npz = np.load(tmp_path / "npz" / "weights.npz")
  st = safetensors.numpy.load_file(str(tmp_path / "st" / "weights.safetensors"))
  params = parameter_arrays(model, cfg)
  export = load_export(tmp_path / "npz")
  for n, value in params.items():
    rounded = value.astype(ml_dtypes.bfloat16)  # an independent rounding (jax's bfloat16 type)
    assert npz[n].dtype == np.uint16 and str(st[n].dtype) == "bfloat16", n
    np.testing.assert_array_equal(npz[n], rounded.view(np.uint16))
    np.testing.assert_array_equal(st[n].view(np.uint16), npz[n])
    np.testing.assert_array_equal(float32_to_bf16_bits(value), npz[n])  # the documented rounding
    np.testing.assert_array_equal(export.arrays[n], rounded.astype(np.float32))
  for n, value in load_export(tmp_path / "st").arrays.items():
    np.testing.assert_array_equal(value, export.arrays[n], err_msg=n)
  # Against the JAX model with the same bf16-rounded weights, the float32 tolerance holds.
  graphdef, state = nnx.split(model)
  rounded_model = nnx.merge(graphdef, jax.tree.map(
      lambda x: jnp.asarray(np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32)), state))
  tokens = np.arange(12)[None] % cfg.vocab_size
  jax_logits = np.asarray(nnx.jit(lambda m, t: m(t)[0])(rounded_model, jnp.asarray(tokens)))
  err = np.max(np.abs(Model(export).forward(tokens) - jax_logits))
  print(f"bfloat16 export: numpy vs jax (bf16-rounded weights) max abs logit diff {err:.2e}")
  assert err < TOLERANCE


def test_array_sha256_hashes_the_stored_bytes_without_a_copy():
  import hashlib  # pylint: disable=import-outside-toplevel
  import tracemalloc  # pylint: disable=import-outside-toplevel
  a = np.random.default_rng(0).standard_normal((1000, 1000)).astype(np.float32)
  for view in (a, a.T, a.astype(">f4"), a[::2], a.view(np.uint16)):  # little endian, C order, as stored
    want = hashlib.sha256(np.ascontiguousarray(view).astype(view.dtype.newbyteorder("<")).tobytes()).hexdigest()
    assert array_sha256(view) == want
  tracemalloc.start()
  try:
    array_sha256(a)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < a.nbytes // 100, peak


def test_bf16_rounding_edge_cases():
  x = np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, -3.3e38, 3.4e38, 1e-40, np.inf, -np.inf, np.nan,
                1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8], np.float32)  # ties round to even
  x = np.concatenate([x, np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 100])
  want = np.asarray(jnp.asarray(x).astype(jnp.bfloat16)).view(np.uint16)
  got = float32_to_bf16_bits(x)
  finite = ~np.isnan(x)
  np.testing.assert_array_equal(got[finite], want[finite])
  assert np.all(np.isnan(bf16_bits_to_float32(got[~finite])))


def test_runtime_imports_neither_jax_nor_flax(exported, exported_safetensors):
  paths = [str(exported["attention"][2]), str(exported_safetensors["attention"])]
  code = (f"import sys; from yanjax.numpy_runtime import Model, load_export, generate\n"
          f"for path in {paths!r}:\n"
          f"  m = Model(load_export(path))\n"
          f"  print(generate(m, [[1, 2, 3]], max_new_tokens=3)[0].tokens)\n"
          f"bad = sorted(k for k in sys.modules if k.split('.')[0] in "
          f"('jax', 'jaxlib', 'flax', 'safetensors', 'ml_dtypes', 'optax', 'orbax'))\n"
          f"assert not bad, bad\n")
  root = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
  assert result.returncode == 0, result.stderr


# ---- bad input ---------------------------------------------------------------------------------------

def _rewrite_npz(path, change):
  arrays = dict(np.load(path / "weights.npz"))
  change(arrays)
  with open(path / "weights.npz", "wb") as f:
    np.savez(f, **arrays)


def _rewrite_config(path, **changes):
  """Edits config.json and the manifest alike (with its checksum): a config that claims other shapes."""
  manifest = json.loads((path / "manifest.json").read_text())
  manifest["config"].update(changes)
  (path / "config.json").write_text(json.dumps(manifest["config"]))
  manifest["files"]["config.json"]["sha256"] = export_module.fmt.sha256_file(path / "config.json")
  (path / "manifest.json").write_text(json.dumps(manifest))


def _name_one_mixer(key, value):
  """The config of an older format, which named its one mixer `key` ("arch": "yan" in format 1, "mixer": "mcsd"
  in format 2), under the current version."""
  return lambda path: _replace_pattern(path, key, value)


def _replace_pattern(path, key, value):
  manifest = json.loads((path / "manifest.json").read_text())
  del manifest["config"]["pattern"]
  manifest["config"][key] = value
  (path / "manifest.json").write_text(json.dumps(manifest))
  _rewrite_config(path)  # config.json and its checksum follow the manifest


def _set_manifest(path, **changes):
  manifest = json.loads((path / "manifest.json").read_text())
  manifest.update(changes)
  (path / "manifest.json").write_text(json.dumps(manifest))


def _flip_byte(path, offset_from_end):
  data = bytearray(path.read_bytes())
  data[-offset_from_end] ^= 0xFF
  path.write_bytes(bytes(data))


CORRUPTIONS = {
    "missing manifest": (lambda p: (p / "manifest.json").unlink(), r"manifest\.json: file missing"),
    "missing weights": (lambda p: (p / "weights.npz").unlink(), r"weights\.npz: file missing"),
    "missing config": (lambda p: (p / "config.json").unlink(), r"config\.json: file missing"),
    "truncated weights": (lambda p: (p / "weights.npz").write_bytes((p / "weights.npz").read_bytes()[:3000]),
                          r"weights\.npz: not a readable \.npz"),
    "garbage manifest": (lambda p: (p / "manifest.json").write_text("{not json"), r"manifest\.json: not readable"),
    "changed array": (lambda p: _rewrite_npz(p, lambda a: a["blocks.1.mixer.proj"].__setitem__((0, 0, 0, 0), 9.0)),
                      r"array 'blocks\.1\.mixer\.proj' fails its sha256 check"),
    "missing array": (lambda p: _rewrite_npz(p, lambda a: a.pop("blocks.0.ffn.down")),
                      r"weights\.npz: array 'blocks\.0\.ffn\.down' missing"),
    "extra array": (lambda p: _rewrite_npz(p, lambda a: a.__setitem__("blocks.9.x", np.zeros(2, np.float32))),
                    r"weights\.npz: array\(s\) \['blocks\.9\.x'\] not listed"),
    "edited config": (lambda p: (p / "config.json").write_text((p / "config.json").read_text().replace(
        '"layers": 2', '"layers": 3')), r"config\.json: sha256 does not match"),
    "config, more layers": (lambda p: _rewrite_config(p, layers=3),
                            r"array 'blocks\.2\.mixer_norm\.scale' \[32\] is implied by the config .*layers"),
    "config, other width": (lambda p: _rewrite_config(p, width=64, channels=8),
                            r"array 'embed\.embedding' has shape \[97, 32\] but the config .* implies \[97, 64\]"),
    "config, untied head": (lambda p: _rewrite_config(p, tie_embeddings=False),
                            r"array 'head' \[32, 97\] is implied by the config"),
    "config, bad value": (lambda p: _rewrite_config(p, combine="product"), r"config\.json: config combine="),
    "config, old arch key": (_name_one_mixer("arch", "yan"), r"config\.json: config arch was renamed: use "
                             r"pattern=\('mcsd',\) \(a uniform model is a pattern of one; was arch='yan'\)$"),
    "config, old mixer key": (_name_one_mixer("mixer", "mcsd"), r"config\.json: config mixer was renamed: use "
                              r"pattern=\('mcsd',\)"),
    "config, pattern not dividing the layers": (lambda p: _rewrite_config(p, pattern=["mcsd", "mcsd", "attention"]),
                                                r"config pattern=\['mcsd', 'mcsd', 'attention'\]: its length 3 "
                                                r"must divide layers=2"),
    "format 1": (lambda p: _set_manifest(p, format_version=1),
                 r"manifest\.json: format_version 1 is not the supported 3 or 4: it names the one mixer config\.arch"),
    "format as a list": (lambda p: _set_manifest(p, format_version=[3]),
                         r"manifest\.json: format_version \[3\] is not the supported 3 or 4$"),
    "format 2": (lambda p: _set_manifest(p, format_version=2),
                 r"manifest\.json: format_version 2 is not the supported 3 or 4: it names the one mixer "
                 r"config\.mixer .* "
                 r"read it with the yanjax that wrote it, or export its run again$"),
    "unknown weights format": (lambda p: _set_manifest(p, weights_format="pt"),
                               r"manifest\.json: weights_format 'pt' not in \('npz', 'safetensors'\)"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_bad_exports_raise_errors_naming_the_file_or_array(exported, tmp_path, case):
  corrupt, message = CORRUPTIONS[case]
  path = _fresh_export(exported, tmp_path)
  corrupt(path)
  with pytest.raises(ExportError, match=message) as info:
    load_export(path)
  print(f"{case}: {info.value}")


def test_corrupt_array_bytes_are_caught_by_the_archive_or_the_checksum(exported, exported_safetensors, tmp_path):
  path = _fresh_export(exported, tmp_path)
  with zipfile.ZipFile(path / "weights.npz") as z:
    info = z.getinfo("blocks.0.mixer.out.npy")
  data = bytearray((path / "weights.npz").read_bytes())
  data[info.header_offset + 200] ^= 0xFF  # inside that member's stored data
  (path / "weights.npz").write_bytes(bytes(data))
  with pytest.raises(ExportError, match=r"weights\.npz: (array 'blocks\.0\.mixer\.out'|sha256)"):
    load_export(path)
  path = tmp_path / "st"
  shutil.copytree(exported_safetensors["yan"], path)
  _flip_byte(path / "weights.safetensors", 10)
  with pytest.raises(ExportError, match=r"weights\.safetensors: array 'final_norm\.scale' fails its sha256"):
    load_export(path)
  (path / "weights.safetensors").write_bytes((path / "weights.safetensors").read_bytes()[:-50])
  with pytest.raises(ExportError, match=r"weights\.safetensors: array '.*' data lies outside the file"):
    load_export(path)


def test_export_refuses_a_config_that_is_not_the_models(exported, tmp_path):
  model, cfg, _ = exported["yan"]
  with pytest.raises(ValueError, match="not the config the model was built with"):
    export_model(model, cfg.replace(layers=3), tmp_path)


def test_export_cli_with_tokenizer_and_numpy_cli(tokenizer_model, tmp_path, monkeypatch, capsys):
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  model, cfg = _model("yan", vocab_size=320)
  monkeypatch.setattr(inference, "load_inference_model",
                      lambda workdir, mesh_spec=None: (model, cfg, str(tokenizer_model)))
  export_cli.main(["--workdir", "run", "--out", str(tmp_path / "out")])
  assert "exported 16 arrays" in capsys.readouterr().out
  export = load_export(tmp_path / "out")
  assert export.tokenizer_path == tmp_path / "out" / "tokenizer.model"
  assert export.manifest["tokenizer"]["eos_id"] == 2 and export.manifest["tokenizer"]["vocab_size"] == 300
  _flip_byte(tmp_path / "out" / "tokenizer.model", 5)
  with pytest.raises(ExportError, match=r"tokenizer\.model: sha256 does not match"):
    load_export(tmp_path / "out")
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
      ["config.json", "manifest.json", "tokenizer.model", "weights.npz"])
  # Re-export over the old one, as safetensors: the old weights.npz goes, and no .tmp is left.
  export_cli.main(["--workdir", "run", "--out", str(tmp_path / "out"), "--format", "safetensors"])
  assert "(weights.safetensors)" in capsys.readouterr().out
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
      ["config.json", "manifest.json", "tokenizer.model", "weights.safetensors"])
  from yanjax.numpy_runtime.__main__ import main as numpy_main  # pylint: disable=import-outside-toplevel
  numpy_main(["--export", str(tmp_path / "out"), "--prompt", "the state", "--max_new_tokens", "6"])
  processor = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
  (c,) = generate(model, [[1] + processor.encode("the state")], max_new_tokens=6, eos_id=2, vocab_limit=300)
  assert capsys.readouterr().out == processor.decode(c.tokens) + "\n"
  with pytest.raises(ValueError, match="tokenizer has 300 pieces but the model's vocab_size is 97"):
    export_model(*_model("yan"), tmp_path / "small", tokenizer_path=tokenizer_model)


# ---- streaming writers and buckets ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_safetensors_is_what_safetensors_writes(exported, tmp_path, dtype):
  """The header computed from shapes alone, then the arrays in its order: the file safetensors.numpy.save_file
  writes for the same arrays, byte for byte (up to the order of the metadata keys, which safetensors writes
  in hash order)."""
  model, cfg, _ = exported["yan_scan_untied_learned_rates"]
  export_model(model, cfg, tmp_path / "ours", dtype=dtype, weights_format="safetensors")
  params = parameter_arrays(model, cfg)
  typed = params if dtype == "float32" else {n: a.astype(ml_dtypes.bfloat16) for n, a in params.items()}
  metadata = {"format": "yanjax-export", "format_version": str(fmt.FORMAT_VERSION), "weights_dtype": dtype}
  safetensors.numpy.save_file(typed, str(tmp_path / "reference.safetensors"), metadata)
  ours = (tmp_path / "ours" / "weights.safetensors").read_bytes()
  reference = (tmp_path / "reference.safetensors").read_bytes()
  n = int.from_bytes(reference[:8], "little")
  assert len(ours) == len(reference) and ours[:8] == reference[:8]
  assert ours[8 + n:] == reference[8 + n:]  # the data, in the same order
  ours_header, reference_header = json.loads(ours[8:8 + n]), json.loads(reference[8:8 + n])
  assert list(ours_header.items())[1:] == list(reference_header.items())[1:]  # entries, in order
  assert list(ours_header)[0] == "__metadata__" and ours_header["__metadata__"] == metadata
  assert len(ours[8:8 + n].rstrip(b" ")) == len(reference[8:8 + n].rstrip(b" "))  # the same padding
  loaded = safetensors.numpy.load_file(str(tmp_path / "ours" / "weights.safetensors"))
  assert list(loaded) == sorted(params) and all(np.array_equal(loaded[k], typed[k]) for k in typed)


@pytest.mark.parametrize("weights_format", ["npz", "safetensors"])
def test_export_is_deterministic(exported, exported_safetensors, tmp_path, weights_format):
  model, cfg, path = exported["attention_scan_untied"]
  path = path if weights_format == "npz" else exported_safetensors["attention_scan_untied"]
  again = export_model(model, cfg, tmp_path, weights_format=weights_format)
  assert again["files"] == json.loads((path / "manifest.json").read_text())["files"]
  for name in (f"weights.{weights_format}", "config.json"):
    assert (tmp_path / name).read_bytes() == (path / name).read_bytes(), name


def test_export_to_a_bucket_and_run_it_from_there(tokenizer_model, tmp_path, s3_bucket, monkeypatch, capsys):
  """--out s3://...: written there directly (with --onnx, its graph too); the NumPy runtime and
  yanjax.inference.generate read it (and the run's tokenizer) from the bucket."""
  from etils import epath  # pylint: disable=import-outside-toplevel

  from yanjax.numpy_runtime.__main__ import main as numpy_main  # pylint: disable=import-outside-toplevel
  model, cfg = _model("yan", vocab_size=320, scan_layers=True)
  remote_tokenizer = epath.Path(f"{s3_bucket}/run/tokenizer.model")
  remote_tokenizer.write_bytes(tokenizer_model.read_bytes())
  monkeypatch.setattr(inference, "load_inference_model",
                      lambda workdir, mesh_spec=None: (model, cfg, remote_tokenizer))
  url = f"{s3_bucket}/exports/tiny"
  export_cli.main(["--workdir", f"{s3_bucket}/run", "--out", url])
  assert "exported 16 arrays" in capsys.readouterr().out
  assert sorted(p.name for p in epath.Path(url).iterdir()) == sorted(
      ["config.json", "manifest.json", "tokenizer.model", "weights.npz"])
  local = export_model(model, cfg, tmp_path / "local", tokenizer_path=tokenizer_model)
  remote = load_export(url)
  assert remote.manifest["files"] == local["files"] and remote.manifest["arrays"] == local["arrays"]
  assert str(remote.tokenizer_path) == f"{url}/tokenizer.model"
  export_cli.main(["--workdir", f"{s3_bucket}/run", "--out", f"{url}_st", "--format", "safetensors", "--onnx"])
  assert "(weights.safetensors, model.onnx)" in capsys.readouterr().out
  local_st = export_model(model, cfg, tmp_path / "local_st", weights_format="safetensors", onnx=True)
  remote_st = load_export(f"{url}_st")
  for name in (fmt.SAFETENSORS, fmt.ONNX, fmt.ONNX_DATA):  # the ONNX files built locally, copied to the bucket
    assert remote_st.manifest["files"][name] == local_st["files"][name], name
    assert fmt.sha256_file(epath.Path(f"{url}_st/{name}")) == local_st["files"][name]["sha256"], name
  for name, value in load_export(tmp_path / "local_st").arrays.items():
    np.testing.assert_array_equal(remote.arrays[name], value, err_msg=name)
    np.testing.assert_array_equal(remote_st.arrays[name], value, err_msg=name)

  numpy_main(["--export", url, "--prompt", "the state", "--max_new_tokens", "6"])
  from_bucket = capsys.readouterr().out
  numpy_main(["--export", str(tmp_path / "local"), "--prompt", "the state", "--max_new_tokens", "6"])
  assert from_bucket == capsys.readouterr().out and len(from_bucket) > 1
  args = types.SimpleNamespace(prompt="the state", prompt_ids=None, prompts_file=None, max_new_tokens=6,
                               temperature=0.0, top_k=0, top_p=1.0, seed=0, no_bos=False, workdir="run")
  generate_cli.run(model, f"{s3_bucket}/run/tokenizer.model", args)
  assert capsys.readouterr().out == from_bucket

  (epath.Path(url) / "weights.npz").write_bytes(b"not a zip")
  with pytest.raises(ExportError, match=r"s3://.*weights\.npz: (not a readable|sha256)"):
    load_export(url)


@pytest.mark.slow
def test_a_trained_hybrid_exports_and_its_numpy_runtime_equals_the_run(small_store, tmp_path):
  """configs/yan_tiny.py:hybrid, trained by the command line (4 steps, window 16 over rows of 32), exported by it,
  and read by the NumPy runtime past the window."""
  from test_train import REPO, run_train, tiny_flags  # pylint: disable=import-outside-toplevel
  flags = [f"--config={REPO / 'configs/yan_tiny.py'}:hybrid", *tiny_flags(small_store, steps=4)[1:],
           "--config.model.window=16"]
  code, _, err = run_train(tmp_path / "run", flags)
  assert code == 0, err[-3000:]
  export_cli.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
  model, cfg, _ = inference.load_inference_model(tmp_path / "run")
  runtime = Model(load_export(tmp_path / "export"))
  assert cfg.pattern == runtime.cfg["pattern"] == ("swa", "mcsd") and runtime.cfg["window"] == 16
  tokens = np.arange(2 * 40).reshape(2, 40) % cfg.vocab_size
  diff = float(np.max(np.abs(runtime.forward(tokens) - np.asarray(model(jnp.asarray(tokens))[0]))))
  print(f"hybrid run vs its export in the NumPy runtime: max abs logit difference {diff:.2e}")
  assert diff < TOLERANCE
