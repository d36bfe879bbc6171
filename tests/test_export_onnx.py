"""The ONNX graph (`--onnx`, yanjax/export/onnx_graph.py) in ONNX Runtime against the NumPy runtime: logits of a
prefill and of decode steps, the states after them (in docs/export.md's layout), and greedy completions, for every
mixer, float32, bfloat16 and int8 exports; the files and the manifest; one-line errors."""

import json
import sys

import numpy as np
import onnx
import pytest
from model_helpers import random_model, small_config

from yanjax.core import cli
from yanjax.export import onnx_graph
from yanjax.export.onnx_session import OnnxModel
from yanjax.export.writer import export_model
from yanjax.inference import loading as inference
from yanjax.main import export as export_cli
from yanjax.numpy_runtime import ExportError, Model, generate, load_export

TOLERANCE = 1e-4  # max |logit difference|, ONNX Runtime vs the NumPy runtime (float32 both; measured <= 1.2e-5)

# Every mixer, both combines, include_current both ways, learned and fixed rates, the selective FFN with k = 1 and
# 2: a call gathers the chosen groups when b t k < E (the hybrid's 2-row decode steps, yan_dd_selective's 1-row
# generation), else runs all groups (prefills, yan_dd_selective's 2-row decode steps).
MODELS = {
    "yan_untied_learned_rates": dict(pattern=("mcsd",), tie_embeddings=False, learnable_rates=True),
    "yan_dd_selective": dict(pattern=("mcsd_dd",), router=True, groups=4, top_k=2, dispatch="dropless"),
    "hybrid": dict(pattern=("swa", "mcsd", "attention"), layers=3, window=4, combine="sum", include_current=True,
                   router=True, groups=4, top_k=1, dispatch="dropless"),
}
EXPORTS = [(name, kind) for name in MODELS for kind in ("float32", "int8")] + [("hybrid", "bfloat16")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(name, kind) -> export directory written with onnx=True."""
  out = {}
  for name, changes in MODELS.items():
    cfg = small_config(**changes)
    model = random_model(cfg)
    for kind in ("float32", "int8", "bfloat16"):
      if (name, kind) in EXPORTS:
        out[name, kind] = tmp_path_factory.mktemp(f"{name}_{kind}")
        export_model(model, cfg, out[name, kind], dtype="bfloat16" if kind == "bfloat16" else "float32",
                     quantize="int8" if kind == "int8" else None, weights_format="safetensors" if kind == "int8"
                     else "npz", onnx=True)
  return out


def _states_agree(numpy_model, numpy_state, onnx_state):
  """The ONNX state equals the NumPy runtime's, read with docs/export.md's layout."""
  position = onnx_state.position
  for i, (mixer, layer) in enumerate(zip(numpy_model.mixers, numpy_state.layers)):
    if hasattr(layer, "h"):  # MCSD: [b, 2C, Dc]
      np.testing.assert_allclose(onnx_state.tensors[f"state.{i}.h"], layer.h, atol=TOLERANCE, rtol=0)
      continue
    if layer.k.shape[1] == mixer.c.get("window") and type(mixer).__name__ == "SlidingWindowAttention":
      # ONNX rows oldest first, row j = position - W + j; the NumPy ring holds position p in slot p % W.
      rows = (position - layer.k.shape[1] + np.arange(layer.k.shape[1])) % layer.k.shape[1]
      k, v = layer.k[:, rows], layer.v[:, rows]
    else:  # attention: the first `position` slots of the KV cache
      k, v = layer.k[:, :position], layer.v[:, :position]
    np.testing.assert_allclose(onnx_state.tensors[f"state.{i}.k"], k, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(onnx_state.tensors[f"state.{i}.v"], v, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name,kind", EXPORTS)
def test_onnx_runtime_equals_numpy_runtime(exported, name, kind):
  """Prefill 7 tokens, prefill 6 more from that state (more than the window of 4), then 9 decode steps: logits and
  states; greedy completions of 2 prompts and of 1."""
  path = exported[name, kind]
  numpy_model, onnx_model = Model(load_export(path)), OnnxModel(path)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 97, (2, 7))
  numpy_logits, numpy_state = numpy_model.prefill(tokens, numpy_model.init_state(2, 24))
  onnx_logits, onnx_state = onnx_model.prefill(tokens, onnx_model.init_state(2))
  worst = [np.abs(numpy_logits - onnx_logits).max()]
  tokens = rng.integers(0, 97, (2, 6))
  numpy_logits, numpy_state = numpy_model.prefill(tokens, numpy_state)
  onnx_logits, onnx_state = onnx_model.prefill(tokens, onnx_state)
  worst.append(np.abs(numpy_logits - onnx_logits).max())
  for _ in range(9):
    tokens = rng.integers(0, 97, 2)
    numpy_logits, numpy_state = numpy_model.decode_step(numpy_state, tokens)
    onnx_logits, onnx_state = onnx_model.decode_step(onnx_state, tokens)
    worst.append(np.abs(numpy_logits - onnx_logits).max())
  print(f"{name} {kind}: max |logit difference| {max(worst):.2e}")
  assert max(worst) < TOLERANCE
  _states_agree(numpy_model, numpy_state, onnx_state)
  prompts = [[1, 5, 9], [3, 4, 5, 6, 7]]
  assert generate(onnx_model, prompts, max_new_tokens=12) == generate(numpy_model, prompts, max_new_tokens=12)
  assert generate(onnx_model, prompts[1:], max_new_tokens=12) == generate(numpy_model, prompts[1:], max_new_tokens=12)


def test_onnx_files_and_manifest(exported):
  """The graph passes onnx's full check; its inputs and outputs are docs/export.md's; an int8 export's matrices
  are int8 in the graph (a quarter of float32's bytes) and the manifest lists both files."""
  path = exported["hybrid", "int8"]
  onnx.checker.check_model(str(path / "model.onnx"), full_check=True)
  graph = onnx.load(str(path / "model.onnx")).graph
  assert [i.name for i in graph.input] == ["tokens", "position", "state.0.k", "state.0.v", "state.1.h",
                                           "state.2.k", "state.2.v"]
  assert [o.name for o in graph.output] == ["logits", "next_state.0.k", "next_state.0.v", "next_state.1.h",
                                            "next_state.2.k", "next_state.2.v"]
  dtypes = {t.name: t.data_type for t in graph.initializer}
  assert dtypes["blocks.1.mixer.proj"] == onnx.TensorProto.INT8
  assert dtypes["blocks.1.mixer.proj.qscale"] == dtypes["blocks.1.mixer.decay_norm.scale"] == onnx.TensorProto.FLOAT
  manifest = json.loads((path / "manifest.json").read_text())
  assert manifest["onnx"] == {"file": "model.onnx", "data": "model.onnx.data", "opset": onnx_graph.OPSET}
  float32 = {t.name: t for t in onnx.load(str(exported["hybrid", "float32"] / "model.onnx")).graph.initializer}
  assert len(float32["blocks.1.mixer.proj"].raw_data) == 4 * len(graph.initializer[[
      t.name for t in graph.initializer].index("blocks.1.mixer.proj")].raw_data)
  assert manifest["files"]["model.onnx.data"]["bytes"] == (path / "model.onnx.data").stat().st_size


def test_onnx_model_refuses_changed_or_missing_files(exported, tmp_path):
  path = tmp_path / "plain"
  export_model(random_model(small_config()), small_config(), path)
  with pytest.raises(ExportError, match="has no model.onnx; export it again with --onnx"):
    OnnxModel(path)
  source = exported["yan_untied_learned_rates", "float32"]
  copy = tmp_path / "copy"
  copy.mkdir()
  for file in source.iterdir():
    (copy / file.name).write_bytes(file.read_bytes())
  data = bytearray((copy / "model.onnx.data").read_bytes())
  data[100] ^= 1
  (copy / "model.onnx.data").write_bytes(bytes(data))
  with pytest.raises(ExportError, match=r"model\.onnx\.data: sha256 does not match"):
    OnnxModel(copy)


def test_export_cli_refuses_a_mixer_without_onnx_form_in_one_line(tmp_path, monkeypatch, capsys):
  """A mixer the graph builder lacks (here swa, taken out of the registry): one line, exit 2, before
  anything is written."""
  cfg = small_config(pattern=("swa", "mcsd"), window=4)
  model = random_model(cfg)
  monkeypatch.setattr(inference, "load_inference_model", lambda workdir, mesh_spec=None: (model, cfg, None))
  monkeypatch.setattr(onnx_graph, "ONNX_FORMS", {k: v for k, v in onnx_graph.ONNX_FORMS.items() if k != "swa"})
  monkeypatch.setattr(sys, "argv", ["export", "--workdir", "run", "--out", str(tmp_path / "out"), "--onnx"])
  with pytest.raises(SystemExit) as exit_:
    cli.run(export_cli.main)
  assert exit_.value.code == 2
  assert capsys.readouterr().err == (
      "error: --onnx: mixer(s) ['swa'] of model.pattern have no ONNX form (ONNX forms exist for mcsd, mcsd_dd, "
      "attention); export without --onnx and run it with the NumPy runtime\n")
  assert list((tmp_path / "out").iterdir()) == []  # the checked-writable --out, nothing written


def test_export_cli_without_the_onnx_package_says_how_to_install_it(tmp_path, monkeypatch, capsys):
  """--onnx where `onnx` is not installed (README command 1's install): one line, exit 2, --out not created."""
  import yanjax.export  # pylint: disable=import-outside-toplevel

  monkeypatch.delattr(yanjax.export, "onnx_graph", raising=False)
  monkeypatch.setitem(sys.modules, "yanjax.export.onnx_graph", None)  # None in sys.modules: ImportError
  monkeypatch.setattr(sys, "argv", ["export", "--workdir", "run", "--out", str(tmp_path / "out"), "--onnx"])
  with pytest.raises(SystemExit) as exit_:
    cli.run(export_cli.main)
  assert exit_.value.code == 2
  error = capsys.readouterr().err
  assert error.startswith("error: --onnx needs the onnx package (") and error.endswith(
      "): pip install -e '.[onnx]' -c constraints.txt\n") and error.count("\n") == 1
  assert not (tmp_path / "out").exists()
