"""The `python -m yanjax.main.export` command.

Export a model as plain arrays for other runtimes (docs/export.md is the format's specification).

The work is the library yanjax.export.writer (usage in its docstring).
"""

from __future__ import annotations

import argparse

import numpy as np

from yanjax.core import cli, storage
from yanjax.export.writer import check_quantize, check_replaceable, export_model, onnx_graph_module
from yanjax.numpy_runtime import format as fmt


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m yanjax.main.export", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True,
                      help="training run directory, local or gs:// / s3:// (latest checkpoint)")
  parser.add_argument("--out", required=True, help="export directory to write, local or gs:// / s3://")
  parser.add_argument("--format", default="npz", choices=fmt.WEIGHT_FORMATS,
                      help="the weights file to write: weights.npz or weights.safetensors")
  parser.add_argument("--dtype", default="float32", choices=fmt.WEIGHT_DTYPES)
  parser.add_argument("--quantize", default=None, help="int8: weight-only int8 projection matrices with "
                      "per-output-channel float32 scales, the rest float32 (docs/export.md, 'int8')")
  parser.add_argument("--onnx", action="store_true", help="also write model.onnx (and its weights, model.onnx.data): "
                      "the model as an ONNX graph for ONNX Runtime, prefill and decode (docs/export.md, 'ONNX')")
  parser.add_argument("--mesh", default=None, help="mesh to restore onto, e.g. fsdp=4 (default: the run's "
                      "training mesh, or FSDP over all devices when it does not fit)")
  args = parser.parse_args(argv)
  check_quantize(args.quantize, args.dtype)  # one line and exit 2, before anything is read
  if args.onnx:
    onnx_graph_module()  # installed, or one line saying how, before --out is created
  out = storage.as_path(args.out)
  storage.check_writable(out, "export directory --out",
                         "give a directory (or bucket URL) these credentials may write")
  check_replaceable(out)  # before the checkpoint is read: refusing takes a moment, not a restore
  from yanjax.inference.loading import load_inference_model  # pylint: disable=import-outside-toplevel
  model, cfg, tokenizer_path = load_inference_model(args.workdir, mesh_spec=args.mesh)
  manifest = export_model(model, cfg, args.out, tokenizer_path=tokenizer_path, dtype=args.dtype,
                          weights_format=args.format, quantize=args.quantize, onnx=args.onnx)
  parameters = [a for a in manifest["arrays"] if "scale_of" not in a]  # an int8 scale is not a parameter
  total = sum(int(np.prod(a["shape"])) for a in parameters)
  print(f"exported {len(parameters)} arrays ({total:,} parameters, {manifest['weights_dtype']}) to {args.out} "
        f"({fmt.WEIGHT_FILES[args.format]}{', ' + fmt.ONNX if args.onnx else ''})")


if __name__ == "__main__":
  cli.run(main)
