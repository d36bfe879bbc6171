"""Export a model as plain arrays for other runtimes (docs/export.md is the format's specification).

Run (a training run's work directory; its latest checkpoint and tokenizer are exported):

    python -m yanjax.export --workdir runs/tiny --out exports/tiny [--dtype bfloat16]

writes `weights.npz`, `weights.safetensors`, `config.json`, `tokenizer.model` (when the run has one) and
`manifest.json` (format version, config, every array's shape / dtype / sha256, file checksums). Array names
are the model's parameter paths joined with dots (`embed.embedding`, `blocks.0.mixer.proj`); parameters of
scanned layers (`scan_layers=True`, stacked over a leading layers axis) are written per layer, so the names
and shapes do not depend on `scan_layers`. The manifest is written last: a directory without one is an
unfinished export. `yanjax.numpy_runtime` loads and runs the result with NumPy only.

bfloat16 (`--dtype bfloat16`): values are rounded to nearest even; safetensors stores them as BF16, and the
.npz, since NumPy has no bfloat16, as their uint16 bit patterns (the float32's upper 16 bits). Readers
upcast to float32 by shifting the bits left by 16.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

import yanjax
from yanjax.config import ModelConfig
from yanjax.numpy_runtime import format as fmt


def parameter_arrays(model, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The model's parameters as float32 NumPy arrays under their export names, in canonical order.

  Raises ValueError if the model holds state other than parameters, or arrays the config does not imply.
  """
  flat = {}
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    if not isinstance(variable, nnx.Param):
      raise ValueError(f"model state {'.'.join(map(str, path))} is a {type(variable).__name__}, not a "
                       f"parameter; the export format holds parameters only")
    value = np.asarray(jax.device_get(variable.get_value()), np.float32)
    names = [str(p) for p in path]
    if cfg.scan_layers and names[0] == "blocks":  # stacked over layers: one array per layer
      for i in range(cfg.layers):
        flat[".".join(["blocks", str(i)] + names[1:])] = value[i]
    else:
      flat[".".join(names)] = value
  expected = fmt.expected_shapes(cfg.to_dict())
  fmt.check_arrays_fit_config({n: a.shape for n, a in flat.items()}, cfg.to_dict(), "model")
  return {name: flat[name] for name in expected}


def _write_atomic(path: pathlib.Path, write) -> None:
  tmp = path.with_name(path.name + ".tmp")
  write(tmp)
  os.replace(tmp, path)


def _file_entry(path: pathlib.Path) -> dict[str, Any]:
  return {"sha256": fmt.sha256_file(path), "bytes": path.stat().st_size}


def export_model(model, cfg: ModelConfig, out_dir, tokenizer_path=None, dtype: str = "float32"
                 ) -> dict[str, Any]:
  """Writes the export of `model` (with config `cfg`) to `out_dir`; returns the manifest.

  Args:
    model: a `LanguageModel` built from `cfg`.
    cfg: its `ModelConfig`.
    out_dir: directory to write (created; files of an earlier export there are replaced).
    tokenizer_path: the sentencepiece model to ship with the weights, or None.
    dtype: "float32" (default) or "bfloat16" (see the module docstring).
  """
  if dtype not in fmt.WEIGHT_DTYPES:
    raise ValueError(f"dtype={dtype!r}: choose one of {fmt.WEIGHT_DTYPES}")
  if getattr(model, "cfg", cfg) != cfg:
    raise ValueError("export_model: cfg is not the config the model was built with")
  arrays = parameter_arrays(model, cfg)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / fmt.MANIFEST).unlink(missing_ok=True)  # the directory is an unfinished export until the end

  if dtype == "bfloat16":
    typed = {n: np.asarray(jnp.asarray(a).astype(jnp.bfloat16)) for n, a in arrays.items()}  # ml_dtypes
    stored = {n: a.view(np.uint16) for n, a in typed.items()}
  else:
    typed = stored = arrays
  metadata = {"format": fmt.FORMAT, "format_version": str(fmt.FORMAT_VERSION), "weights_dtype": dtype}
  _write_atomic(out / fmt.NPZ, lambda p: _savez(p, stored))
  _write_atomic(out / fmt.SAFETENSORS, lambda p: safetensors.numpy.save_file(typed, str(p), metadata))
  config = cfg.to_dict()
  _write_atomic(out / fmt.CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"))
  files = {name: _file_entry(out / name) for name in (fmt.NPZ, fmt.SAFETENSORS, fmt.CONFIG)}

  tokenizer = None
  (out / fmt.TOKENIZER).unlink(missing_ok=True)
  if tokenizer_path is not None:
    tokenizer = _tokenizer_entry(tokenizer_path, cfg)
    _write_atomic(out / fmt.TOKENIZER, lambda p: shutil.copyfile(tokenizer_path, p))
    tokenizer.update(file=fmt.TOKENIZER, **_file_entry(out / fmt.TOKENIZER))
    files[fmt.TOKENIZER] = _file_entry(out / fmt.TOKENIZER)

  manifest = {
      "format": fmt.FORMAT,
      "format_version": fmt.FORMAT_VERSION,
      "created_by": f"yanjax {yanjax.__version__}",
      "weights_dtype": dtype,
      "config": config,
      "arrays": [{"name": n, "shape": list(a.shape), "dtype": dtype,
                  "npz_dtype": "uint16" if dtype == "bfloat16" else "float32",
                  "sha256": fmt.array_sha256(stored[n])} for n, a in stored.items()],
      "files": files,
      "tokenizer": tokenizer,
  }
  _write_atomic(out / fmt.MANIFEST,
                lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8"))
  return manifest


def _savez(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare path
    np.savez(f, **arrays)


def _tokenizer_entry(path, cfg: ModelConfig) -> dict[str, Any]:
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  try:
    processor = spm.SentencePieceProcessor(model_file=str(path))
  except (OSError, RuntimeError) as e:
    raise ValueError(f"{path}: not a readable sentencepiece model ({e})") from e
  if processor.vocab_size() > cfg.vocab_size:
    raise ValueError(f"{path}: the tokenizer has {processor.vocab_size()} pieces but the model's "
                     f"vocab_size is {cfg.vocab_size}")
  return {"vocab_size": processor.vocab_size(), "bos_id": processor.bos_id(), "eos_id": processor.eos_id(),
          "unk_id": processor.unk_id(), "pad_id": processor.pad_id()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m yanjax.export", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="training run directory (latest checkpoint)")
  parser.add_argument("--out", required=True, help="export directory to write")
  parser.add_argument("--dtype", default="float32", choices=fmt.WEIGHT_DTYPES)
  args = parser.parse_args(argv)
  from yanjax.checkpointing import load_inference_model  # pylint: disable=import-outside-toplevel
  model, cfg, tokenizer_path = load_inference_model(args.workdir)
  manifest = export_model(model, cfg, args.out, tokenizer_path=tokenizer_path, dtype=args.dtype)
  total = sum(int(np.prod(a["shape"])) for a in manifest["arrays"])
  print(f"exported {len(manifest['arrays'])} arrays ({total:,} parameters, {args.dtype}) to {args.out}")


if __name__ == "__main__":
  main()
