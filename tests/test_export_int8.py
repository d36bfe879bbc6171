"""Weight-only int8 exports (`--quantize int8`, format version 4): which arrays are int8 and along which axes,
the documented rounding, npz == safetensors (the file safetensors writes), the NumPy runtime equal to the JAX
model run with the dequantized weights, and one-line errors for bad requests and unreadable versions."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from model_helpers import random_model, small_config

from yanjax.core import cli
from yanjax.export.writer import export_model, parameter_arrays
from yanjax.main import export as export_cli
from yanjax.numpy_runtime import ExportError, Model, load_export
from yanjax.numpy_runtime.quantize import dequantize_int8, quantize_int8

TOLERANCE = 1e-4  # NumPy runtime vs JAX model, both with the dequantized weights (as tests/test_export.py)

MODELS = {
    "yan_untied_learned_rates": dict(pattern=("mcsd",), tie_embeddings=False, learnable_rates=True),
    "yan_dd_selective": dict(pattern=("mcsd_dd",), learnable_rates=True, router=True, groups=4, top_k=2,
                             dispatch="dropless"),
    "hybrid_attention": dict(pattern=("swa", "mcsd", "attention"), layers=3, window=4),
}
# What is int8 in each model (every other array stays float32).
INT8 = {
    "yan_untied_learned_rates": {"embed.embedding", "head"} | {f"blocks.{i}.{n}" for i in range(2) for n in (
        "mixer.proj", "mixer.out", "ffn.gate_up", "ffn.down")},
    "yan_dd_selective": {"embed.embedding"} | {f"blocks.{i}.{n}" for i in range(2) for n in (
        "mixer.proj", "mixer.out", "ffn.gate_up", "ffn.down")},
    "hybrid_attention": {"embed.embedding"} | {f"blocks.{i}.{n}" for i in range(3) for n in (
        ["mixer.qkv", "mixer.out"] if i != 1 else ["mixer.proj", "mixer.out"]) + ["ffn.gate_up", "ffn.down"]},
}
SCALE_SHAPES = {  # (weight shape, scale shape) for D=32, C=4, Dc=8, H=2, Dh=16, F=64, V=97, E=4, g=16
    "yan_untied_learned_rates": {
        "embed.embedding": ((97, 32), (97,)),
        "head": ((32, 97), (97,)),
        "blocks.0.mixer.proj": ((4, 8, 4, 8), (4, 4, 8)),
        "blocks.1.mixer.out": ((2, 4, 8, 32), (32,)),
        "blocks.0.ffn.gate_up": ((32, 2, 64), (2, 64)),
        "blocks.0.ffn.down": ((64, 32), (32,)),
    },
    "yan_dd_selective": {
        "blocks.1.ffn.gate_up": ((4, 32, 2, 16), (4, 2, 16)),
        "blocks.1.ffn.down": ((4, 16, 32), (4, 32)),
    },
    "hybrid_attention": {
        "blocks.0.mixer.qkv": ((32, 3, 2, 16), (3, 2, 16)),
        "blocks.2.mixer.out": ((2, 16, 32), (32,)),
        "blocks.1.mixer.out": ((2, 4, 8, 32), (32,)),
    },
}


def _model(name):
  cfg = small_config(**MODELS[name])
  return random_model(cfg), cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """name -> (model, cfg, float32 export, int8 .npz export, int8 .safetensors export)."""
  out = {}
  for name in MODELS:
    model, cfg = _model(name)
    paths = [tmp_path_factory.mktemp(f"{name}_{kind}") for kind in ("f32", "int8", "int8_st")]
    export_model(model, cfg, paths[0])
    export_model(model, cfg, paths[1], quantize="int8")
    export_model(model, cfg, paths[2], quantize="int8", weights_format="safetensors")
    out[name] = (model, cfg, *paths)
  return out


def test_quantize_int8_arithmetic():
  """scale = max |w| / 127 per output channel, round half to even, the extreme at +-127, a zero channel zero."""
  w = np.array([[127.0, 1.5, 0.0], [-63.5, 2.5, 0.0], [0.5, -254.0, 0.0]], np.float32)  # [in 3, out 3]
  q, scale = quantize_int8(w, (0,))
  np.testing.assert_array_equal(scale, np.float32([127.0, 254.0, 0.0]) / np.float32(127))
  np.testing.assert_array_equal(q, [[127, 1, 0], [-64, 1, 0], [0, -127, 0]])  # -63.5 -> -64, 0.5 -> 0: to even
  assert q.dtype == np.int8 and scale.dtype == np.float32
  np.testing.assert_array_equal(dequantize_int8(q, scale, (0,)), q.astype(np.float32) * scale[None, :])
  x = np.random.default_rng(0).standard_normal((4, 5, 6)).astype(np.float32)
  q, scale = quantize_int8(x, (0, 2))  # two contraction axes: one scale per index of axis 1
  assert scale.shape == (5,) and np.all(np.max(np.abs(q), axis=(0, 2)) == 127)
  err = np.abs(dequantize_int8(q, scale, (0, 2)) - x)
  assert np.all(err <= scale[None, :, None] / 2 * (1 + 1e-6))


@pytest.mark.parametrize("name", list(MODELS))
def test_int8_export_layout_and_runtime(exported, name):
  model, cfg, f32_path, int8_path, st_path = exported[name]
  manifest = json.loads((int8_path / "manifest.json").read_text())
  assert manifest["format_version"] == 4 and manifest["weights_dtype"] == "int8"
  assert manifest["quantization"]["method"] == "int8"
  params = parameter_arrays(model, cfg)
  entries = {a["name"]: a for a in manifest["arrays"]}
  int8 = {n for n, a in entries.items() if a["dtype"] == "int8"}
  assert int8 == INT8[name]
  assert set(entries) == set(params) | {n + ".qscale" for n in int8}
  assert SCALE_SHAPES[name].keys() <= int8
  stored = np.load(int8_path / "weights.npz")
  export = load_export(int8_path)
  for n, value in params.items():
    if n not in int8:  # rates, rate_gate, norms, router: float32, bit for bit
      assert entries[n]["dtype"] == "float32" and stored[n].dtype == np.float32, n
      np.testing.assert_array_equal(export.arrays[n], value, err_msg=n)
      continue
    axes = tuple(entries[n]["contraction_axes"])
    q, scale = stored[n], stored[entries[n]["scale"]]
    assert q.dtype == np.int8 and scale.dtype == np.float32 and entries[n]["scale"] == n + ".qscale"
    assert entries[n + ".qscale"] == {**entries[n + ".qscale"], "dtype": "float32", "scale_of": n}
    if n in SCALE_SHAPES[name]:
      assert (q.shape, scale.shape) == SCALE_SHAPES[name][n], n
    want = np.max(np.abs(value), axis=axes) / np.float32(127)  # the documented formula, independently
    np.testing.assert_array_equal(scale, want.astype(np.float32), err_msg=n)
    np.testing.assert_array_equal(q, np.clip(np.rint(value / np.expand_dims(want, axes)), -127, 127), err_msg=n)
    assert np.all(np.max(np.abs(q), axis=axes) == 127), n
    np.testing.assert_array_equal(export.arrays[n], q.astype(np.float32) * np.expand_dims(scale, axes))
  # safetensors: the same arrays and checksums (I8 and F32), the file safetensors itself writes.
  st_manifest = json.loads((st_path / "manifest.json").read_text())
  assert st_manifest["arrays"] == manifest["arrays"]
  reference = st_path / "reference.safetensors"
  safetensors.numpy.save_file(dict(stored), str(reference), {"format": "yanjax-export", "format_version": "4",
                                                              "weights_dtype": "int8"})
  ours, theirs = (st_path / "weights.safetensors").read_bytes(), reference.read_bytes()
  n = int.from_bytes(theirs[:8], "little")
  assert ours[:8] == theirs[:8] and ours[8 + n:] == theirs[8 + n:]
  assert list(json.loads(ours[8:8 + n]).items())[1:] == list(json.loads(theirs[8:8 + n]).items())[1:]
  reference.unlink()
  for k, value in load_export(st_path).arrays.items():
    np.testing.assert_array_equal(value, export.arrays[k], err_msg=k)

  # The NumPy runtime on the int8 export is the JAX model with the dequantized weights, within the float32
  # tolerance; and it is near (not equal to) the float32 export.
  graphdef, state = nnx.split(model)
  flat = nnx.to_flat_state(state)
  for path, variable in flat:
    variable.set_value(jnp.asarray(export.arrays[".".join(map(str, path))]))
  dequantized = nnx.merge(graphdef, nnx.from_flat_state(flat))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 13), 0, cfg.vocab_size)
  want = np.asarray(nnx.jit(lambda m, t: m(t)[0])(dequantized, tokens))
  runtime = Model(export)
  got = runtime.forward(np.asarray(tokens))
  err = np.max(np.abs(got - want))
  f32 = Model(load_export(f32_path)).forward(np.asarray(tokens))
  drift = np.max(np.abs(got - f32))
  print(f"{name}: int8 numpy vs jax (dequantized) {err:.2e}; int8 vs float32 export {drift:.2e} "
        f"(logits up to {np.abs(f32).max():.1f})")
  assert err < TOLERANCE
  assert 0 < drift < 0.1 * np.abs(f32).max()  # random weights of scale 0.3: int8 moves logits by a few %
  logits, state = runtime.prefill(np.asarray(tokens[:1, :6]), runtime.init_state(1))  # recurrent decode too
  steps = [logits]
  for t in range(6, 13):
    logits, state = runtime.decode_step(state, np.asarray(tokens[:1, t]))
    steps.append(logits[:, None])
  assert np.max(np.abs(np.concatenate(steps, 1) - want[:1])) < TOLERANCE


def _edit_manifest(path, change):
  manifest = json.loads((path / "manifest.json").read_text())
  change(manifest)
  (path / "manifest.json").write_text(json.dumps(manifest))


def _entry(manifest, name):
  return next(a for a in manifest["arrays"] if a["name"] == name)


BAD = {
    "newer version": (lambda m: m.update(format_version=5),
                      r"format_version 5 is not the supported 3 or 4: a newer yanjax wrote it"),
    "version 3 claiming int8": (lambda m: m.update(format_version=3),
                                r"weights_dtype 'int8' is not one of format_version 3's \('float32', 'bfloat16'\)"),
    "version 4 claiming float32": (lambda m: m.update(weights_dtype="float32"),
                                   r"weights_dtype 'float32' is not one of format_version 4's \('int8',\)"),
    "matrix listed as float32": (lambda m: _entry(m, "blocks.0.ffn.down").update(dtype="float32",
                                                                                   npz_dtype="float32"),
                                 r"array 'blocks.0.ffn.down' is listed as 'float32' .* stores it as 'int8'"),
    "other axes": (lambda m: _entry(m, "blocks.0.mixer.proj").update(contraction_axes=[3]),
                   r"array 'blocks.0.mixer.proj' has contraction_axes=\[3\] but .* implies \(1,\)"),
    "scale missing": (lambda m: m.update(arrays=[a for a in m["arrays"] if a["name"] != "head.qscale"]),
                      r"array 'head.qscale' \(the int8 scale of 'head'\) is not listed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_int8_manifests_are_refused_in_one_line(exported, tmp_path, case):
  import shutil  # pylint: disable=import-outside-toplevel
  path = tmp_path / "export"
  shutil.copytree(exported["yan_untied_learned_rates"][3], path)
  change, message = BAD[case]
  _edit_manifest(path, change)
  with pytest.raises(ExportError, match=message) as error:
    load_export(path)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("flags, message", [
    (["--quantize", "int4"], "error: --quantize int4: unknown; choose one of int8 (or leave it out for "
                             "unquantized weights)\n"),
    (["--quantize", "int8", "--dtype", "bfloat16"], "error: --quantize int8 with --dtype bfloat16: int8 scales and "
                                                    "the arrays kept unquantized are float32; leave out --dtype\n"),
])
def test_export_cli_refuses_bad_quantize_in_one_line(tmp_path, monkeypatch, capsys, flags, message):
  monkeypatch.setattr(sys, "argv", ["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                                    *flags])
  with pytest.raises(SystemExit) as exit_:
    cli.run(export_cli.main)
  assert exit_.value.code == 2 and capsys.readouterr().err == message
  assert not (tmp_path / "out").exists()
