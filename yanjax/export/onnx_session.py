"""Run an export's ONNX graph (`--onnx`, yanjax/export/onnx_graph.py) with ONNX Runtime, as the NumPy runtime's
`Model` is run: `init_state`, `prefill`, `decode_step`, so `yanjax.numpy_runtime.generate` drives either.

    from yanjax.export.onnx_session import OnnxModel
    from yanjax.numpy_runtime import generate
    completions = generate(OnnxModel("exports/tiny"), [[1, 17, 42]], max_new_tokens=32, eos_id=2)

Shapes: the legend in docs/model.md.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
import onnxruntime

from yanjax.numpy_runtime import format as fmt

from .onnx_graph import LOGITS, POSITION, TOKENS


class OnnxState(NamedTuple):
  tensors: dict[str, np.ndarray]  # graph input name (state.{i}.h, .k, .v) -> its value
  position: int  # tokens consumed so far by every row


class OnnxModel:
  """An export directory's model.onnx in an onnxruntime CPU session."""

  def __init__(self, export_dir, threads: int = 0, verify: bool = True):
    """export_dir: an export written with --onnx (local); verify: check model.onnx and model.onnx.data against
    the manifest's sha256. threads: onnxruntime's intra-op threads (0: its default, one per core)."""
    root = fmt.as_path(export_dir)
    if not root.is_dir():
      raise fmt.ExportError(f"{root}: export directory missing")
    manifest = json.loads((root / fmt.MANIFEST).read_text()) if (root / fmt.MANIFEST).is_file() else {}
    if manifest.get("format") != fmt.FORMAT:
      raise fmt.ExportError(f"{root / fmt.MANIFEST}: missing or not a {fmt.FORMAT} manifest")
    if "onnx" not in manifest:
      raise fmt.ExportError(f"{root}: the export has no {fmt.ONNX}; export it again with --onnx")
    self.cfg = fmt.check_config(manifest["config"])
    for name in (fmt.ONNX, fmt.ONNX_DATA):
      if not (root / name).is_file():
        raise fmt.ExportError(f"{root / name}: file missing (listed in {fmt.MANIFEST})")
      if verify and fmt.sha256_file(root / name) != manifest["files"][name]["sha256"]:
        raise fmt.ExportError(f"{root / name}: sha256 does not match {fmt.MANIFEST}: the file is corrupt or changed")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    self.session = onnxruntime.InferenceSession(str(root / fmt.ONNX), options, providers=["CPUExecutionProvider"])
    self.state_inputs = [i for i in self.session.get_inputs() if i.name not in (TOKENS, POSITION)]

  def init_state(self, batch: int, max_len: int | None = None) -> OnnxState:
    """Empty state: zeros, with no cached keys for attention ("past" = 0; `max_len` is not needed)."""
    del max_len
    shapes = {i.name: [batch if d == "batch" else 0 if d == "past" else d for d in i.shape]
              for i in self.state_inputs}
    return OnnxState({name: np.zeros(shape, np.float32) for name, shape in shapes.items()}, 0)

  def prefill(self, tokens, state: OnnxState) -> tuple[np.ndarray, OnnxState]:
    """tokens [b, t] continuing every row from `state` -> (logits [b, t, V], the state after them)."""
    tokens = np.asarray(tokens, np.int64)
    feeds = {TOKENS: tokens, POSITION: np.array(state.position, np.int64), **state.tensors}
    names = [LOGITS] + ["next_" + n for n in state.tensors]
    logits, *tensors = self.session.run(names, feeds)
    return logits, OnnxState(dict(zip(state.tensors, tensors)), state.position + tokens.shape[1])

  def decode_step(self, state: OnnxState, tokens) -> tuple[np.ndarray, OnnxState]:
    """tokens [b] -> (logits [b, V], state)."""
    logits, state = self.prefill(np.asarray(tokens)[:, None], state)
    return logits[:, 0], state
