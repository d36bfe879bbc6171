"""Export a model as plain arrays for other runtimes (docs/export.md is the format's specification).

Run (a training run's work directory; its latest checkpoint and tokenizer are exported; either path may be
local or a bucket URL, gs:// or s3://):

    python -m yanjax.main.export --workdir runs/tiny --out exports/tiny [--format safetensors] \
        [--dtype bfloat16 | --quantize int8] [--mesh fsdp=4]

writes the weights in the one format asked for (`weights.npz`, the default, or `weights.safetensors`),
`config.json`, the run's tokenizer under its own name (`tokenizer.model` or `tokenizer.json`, when the run has
one) and `manifest.json` (format version, config, weights format, every array's shape / dtype / sha256, file
checksums). Array names are the model's parameter paths joined with dots (`embed.embedding`,
`blocks.0.mixer.proj`); parameters of scanned layers (`scan_layers=True`: `blocks.{j}`, pattern position j,
stacked over the L / P repetitions of the pattern) are written per layer (repetition r is layer r P + j), so the
names and shapes do not depend on `scan_layers`. The manifest is written last:
a directory without one is an unfinished export.

Nothing is lost: the export is written into a new sibling `<out>.tmp-<random>` and replaces `<out>` only
once complete (locally by renames; on object stores by server-side copies, the old manifest deleted first and
the new one copied last); a failed export removes its temporary directory and leaves the old export as it
was. `<out>` is replaced only when it is missing, empty or an export (nothing but the export's files, and a
yanjax manifest if it has one); a directory holding anything else is refused, never touched.

The export streams: the checkpoint is restored onto a device mesh (yanjax.inference.loading; --mesh), and each array
is fetched to the host on its own (one layer's slice of a scanned parameter), converted, hashed, written and
dropped, so host memory is bounded by the largest array, not the model. The weights file is written
straight to its destination, a bucket included (no local copy first). `yanjax.numpy_runtime` loads and
runs the result with NumPy only.

bfloat16 (`--dtype bfloat16`): values are rounded to nearest even; safetensors stores them as BF16, and the
.npz, since NumPy has no bfloat16, as their uint16 bit patterns (the float32's upper 16 bits). Readers
upcast to float32 by shifting the bits left by 16.

int8 (`--quantize int8`, format version 4): the projection matrices (yanjax.numpy_runtime.quantize's table)
are fetched as float32 and quantized on the host, one at a time, to int8 with one float32 scale per output
channel (`<name>.qscale`); the other arrays are written as float32. Readers dequantize: float32(q) * scale.
float32 and bfloat16 exports are format version 3, unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import pathlib
import shutil
import tempfile
import zipfile
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

import yanjax
from yanjax.core import storage
from yanjax.core.config import ConfigError
from yanjax.data import tokenizer as tokenization
from yanjax.data.errors import TokenizerMismatchError
from yanjax.model.config import ModelConfig
from yanjax.numpy_runtime import format as fmt
from yanjax.numpy_runtime.quantize import QUANTIZE_METHODS, quantize_int8

_STORED = fmt.STORED_DTYPES  # as written: bf16 as its bit pattern
_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "int8": "I8"}
EXPORT_FILES = (fmt.MANIFEST, fmt.CONFIG, fmt.NPZ, fmt.SAFETENSORS, *tokenization.FILE_NAMES.values(), fmt.ONNX,
                fmt.ONNX_DATA)
# The names an export directory may hold: its files, and the `<name>.tmp` an interrupted export of earlier
# yanjax versions (which wrote in place) left behind.
_REPLACEABLE = EXPORT_FILES + tuple(f"{name}.tmp" for name in EXPORT_FILES)


# ---- parameters, one at a time ----------------------------------------------------------------------

class Source(NamedTuple):
  """Where one exported array's values are: a model parameter, or one layer of a stacked one."""
  value: Any  # the parameter as the model holds it (a jax.Array, possibly sharded, possibly [layers, ...])
  layer: int | None  # index into the leading repetitions axis of a scanned parameter; None: the whole value
  shape: tuple[int, ...]  # the exported array's shape


def parameter_sources(model, cfg: ModelConfig) -> dict[str, Source]:
  """Export name -> `Source`, in canonical order; nothing is copied.

  Raises ValueError if the model holds state other than parameters, or arrays the config does not imply.
  """
  sources = {}
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    if not isinstance(variable, nnx.Param):
      raise ValueError(f"model state {'.'.join(map(str, path))} is a {type(variable).__name__}, not a "
                       f"parameter; the export format holds parameters only")
    value = variable.get_value()
    names = [str(p) for p in path]
    if cfg.scan_layers and names[0] == "blocks":  # blocks.{j}, stacked over repetitions: one array per layer
      position, period = int(names[1]), len(cfg.pattern)
      for r in range(cfg.layers // period):
        sources[".".join(["blocks", str(r * period + position)] + names[2:])] = Source(value, r, value.shape[1:])
    else:
      sources[".".join(names)] = Source(value, None, tuple(value.shape))
  fmt.check_arrays_fit_config({n: s.shape for n, s in sources.items()}, cfg.to_dict(), "model")
  return {name: sources[name] for name in fmt.expected_shapes(cfg.to_dict())}


@functools.partial(jax.jit, static_argnames="dtype")
def _convert(value, dtype: str):
  return value.astype(jnp.float32).astype(dtype)


@functools.partial(jax.jit, static_argnames="dtype")
def _convert_layer(value, layer, dtype: str):
  return jax.lax.dynamic_index_in_dim(value, layer, keepdims=False).astype(jnp.float32).astype(dtype)


def fetch(source: Source, dtype: str = "float32") -> np.ndarray:
  """One array on the host as stored: C-order little-endian float32, or bfloat16 bit patterns as uint16.

  Only this array leaves the devices (a scanned parameter is sliced on device first).
  """
  if source.layer is not None:
    piece = _convert_layer(source.value, np.int32(source.layer), dtype=dtype)
  elif dtype == "float32" and source.value.dtype == np.float32:
    piece = source.value
  else:
    piece = _convert(source.value, dtype=dtype)
  host = np.asarray(jax.device_get(piece))
  if dtype == "bfloat16":
    host = host.view(np.uint16)
  return np.ascontiguousarray(host, _STORED[dtype])


def parameter_arrays(model, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Every parameter as a float32 NumPy array under its export name, in canonical order (the whole model on
  the host: for tests and small models; `export_model` streams instead)."""
  return {name: fetch(source) for name, source in parameter_sources(model, cfg).items()}


class Stored(NamedTuple):
  """One array of the weights file: its shape, stored dtype ("float32", "bfloat16", "int8") and how to make it."""
  shape: tuple[int, ...]
  dtype: str
  make: Callable[[], np.ndarray]  # -> the array as stored (C order, little endian)


def stored_sources(sources: dict[str, Source], cfg: ModelConfig, dtype: str, quantize: str | None
                   ) -> dict[str, Stored]:
  """Export name -> `Stored`, in canonical order: every parameter in `dtype`; with quantize="int8" the arrays of
  quantize.CONTRACTION_AXES as int8, each followed by its float32 scale `<name>.qscale`, the rest float32.

  An int8 matrix and its scale come from one quantization on the host (of the float32 array, fetched alone);
  the last one is kept, so the .npz (matrix, then scale) fetches each array once, the .safetensors (float32
  arrays first, scales among them) twice.
  """
  if quantize is None:
    return {n: Stored(s.shape, dtype, functools.partial(fetch, s, dtype)) for n, s in sources.items()}
  last: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def quantized(name, axes, part):
    if name not in last:
      last.clear()
      last[name] = quantize_int8(fetch(sources[name]), axes)
    return last[name][part]

  layout = fmt.stored_arrays(cfg.to_dict(), fmt.INT8)
  stored = {}
  for name, entry in layout.items():
    shape = tuple(entry["shape"])
    if entry["dtype"] == fmt.INT8:
      stored[name] = Stored(shape, fmt.INT8, functools.partial(quantized, name, entry["contraction_axes"], 0))
    elif "scale_of" in entry:
      matrix = entry["scale_of"]
      axes = layout[matrix]["contraction_axes"]
      stored[name] = Stored(shape, "float32", functools.partial(quantized, matrix, axes, 1))
    else:
      stored[name] = Stored(shape, "float32", functools.partial(fetch, sources[name]))
  return stored


# ---- streams ----------------------------------------------------------------------------------------

class _HashingWriter:
  """A write-only, unseekable stream that counts and hashes the bytes it passes on to `raw`."""

  def __init__(self, raw):
    self.raw = raw
    self.digest = hashlib.sha256()
    self.bytes = 0

  def write(self, data) -> int:
    view = memoryview(data).cast("B")
    self.raw.write(view)
    self.digest.update(view)
    self.bytes += len(view)
    return len(view)

  def tell(self) -> int:  # zipfile asks; it cannot seek, so it writes data descriptors after each member
    return self.bytes

  def flush(self) -> None:
    self.raw.flush()

  def entry(self) -> dict[str, Any]:
    return {"sha256": self.digest.hexdigest(), "bytes": self.bytes}


@contextlib.contextmanager
def _create(path: epath.Path) -> Iterator[_HashingWriter]:
  """A hashing stream writing the file `path` (in the export's temporary directory)."""
  with path.open("wb") as raw:
    yield _HashingWriter(raw)


def _write_npz(path: epath.Path, arrays: dict[str, Stored]) -> tuple[dict, dict[str, str]]:
  """Writes the .npz one member at a time (as np.savez lays it out); returns (file entry, name -> sha256)."""
  digests = {}
  with _create(path) as stream:
    with zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
      for name, array in arrays.items():
        stored = array.make()
        digests[name] = fmt.array_sha256(stored)
        with archive.open(name + ".npy", "w", force_zip64=True) as member:
          np.lib.format.write_array(member, stored, allow_pickle=False)
        del stored
  return stream.entry(), digests


def safetensors_header(shapes: dict[str, tuple[int, ...]], dtype: str | dict[str, str], metadata: dict[str, str]
                       ) -> tuple[bytes, list[str]]:
  """(the first bytes of the .safetensors file, the order of the arrays' data), from shapes and dtypes alone.

  `dtype`: every array's ("float32", "bfloat16", "int8"), or a dict name -> dtype. The layout
  `safetensors.numpy.save_file` writes: 8-byte little-endian length n, then n bytes of compact JSON
  ({"__metadata__": ..., name: {dtype, shape, data_offsets}, ...}, padded with spaces to a multiple of 8); the
  data follows in the header's order: wider dtypes first (float32 before int8, so every array stays aligned),
  then names sorted bytewise; offsets counted from the end of the header.
  """
  dtypes = dtype if isinstance(dtype, dict) else dict.fromkeys(shapes, dtype)
  order = sorted(shapes, key=lambda n: (-_STORED[dtypes[n]].itemsize, n.encode("utf-8")))
  header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
  offset = 0
  for name in order:
    size = _STORED[dtypes[name]].itemsize * math.prod(shapes[name])
    header[name] = {"dtype": _SAFETENSORS_DTYPE[dtypes[name]], "shape": list(shapes[name]),
                    "data_offsets": [offset, offset + size]}
    offset += size
  text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
  text += b" " * (-len(text) % 8)
  return len(text).to_bytes(8, "little") + text, order


def _write_safetensors(path: epath.Path, arrays: dict[str, Stored], metadata: dict[str, str]
                       ) -> tuple[dict, dict[str, str]]:
  """Writes the header, then each array's bytes in the header's order; returns (file entry, name -> sha256)."""
  header, order = safetensors_header({n: a.shape for n, a in arrays.items()},
                                     {n: a.dtype for n, a in arrays.items()}, metadata)
  digests = {}
  with _create(path) as stream:
    stream.write(header)
    for name in order:
      stored = arrays[name].make()
      digests[name] = fmt.array_sha256(stored)
      stream.write(stored)
      del stored
  return stream.entry(), digests


def _write_bytes(path: epath.Path, data: bytes) -> dict[str, Any]:
  with _create(path) as stream:
    stream.write(data)
  return stream.entry()


# ---- the export -------------------------------------------------------------------------------------

def check_replaceable(out) -> None:
  """Raises ConfigError unless `out` may be replaced by an export: missing, empty, or an export yanjax wrote
  (nothing but the export's files, and a yanjax manifest if it has one). Anything else is never touched."""
  out = storage.as_path(out)
  if storage.is_bucket_root(out):
    raise ConfigError(f"{out} is a bucket; export to a path inside it, such as {out}/exports/name")
  foreign = storage.foreign_entries(out, _REPLACEABLE)
  if foreign:
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise ConfigError(f"{out} holds files that are not part of a yanjax export ({shown}), so it is not "
                      "replaced; export to a new directory")
  manifest = out / fmt.MANIFEST
  if manifest.exists():
    try:
      ours = json.loads(manifest.read_text()).get("format") == fmt.FORMAT
    except (ValueError, AttributeError):
      ours = False
    if not ours:
      raise ConfigError(f"{manifest} is not the manifest of a yanjax export, so {out} is not replaced; "
                        "export to a new directory")


def export_model(model, cfg: ModelConfig, out_dir, tokenizer_path=None, dtype: str = "float32",
                 weights_format: str = "npz", quantize: str | None = None, onnx: bool = False) -> dict[str, Any]:
  """Writes the export of `model` (with config `cfg`) to `out_dir`, one array at a time; returns the manifest.

  The export is written to a temporary sibling of `out_dir` and moved into place once complete; on failure
  `out_dir` is left as it was (see the module docstring).

  Args:
    model: a `LanguageModel` built from `cfg` (its parameters on any devices, sharded or not).
    cfg: its `ModelConfig`.
    out_dir: directory to write, local or gs:// / s3://: created, or replaced if it holds an earlier export
      (ConfigError if it holds anything else, see `check_replaceable`).
    tokenizer_path: the tokenizer.model or tokenizer.json to ship with the weights (local or a URL), or None;
      refused (TokenizerMismatchError) when it has more ids than the model's vocabulary.
    dtype: "float32" (default) or "bfloat16" (see the module docstring).
    weights_format: "npz" (default) or "safetensors" (`fmt.WEIGHT_FORMATS`): the one weights file written.
    quantize: None (default), or "int8": weight-only int8 projection matrices with per-output-channel float32
      scales, the other arrays float32 (format version 4; docs/export.md, "int8"). Only with dtype="float32".
    onnx: also write the ONNX graph of the export, `model.onnx` and its weights `model.onnx.data`
      (yanjax/export/onnx_graph.py; docs/export.md, "ONNX"); needs the `onnx` extra. ExportError when a mixer
      of the model has no ONNX form.
  """
  check_quantize(quantize, dtype)
  if onnx:
    try:
      onnx_graph_module().check_onnx_config(cfg.to_dict())
    except fmt.ExportError as e:
      raise ConfigError(str(e)) from e
  if dtype not in fmt.WEIGHT_DTYPES:
    raise ValueError(f"dtype={dtype!r}: choose one of {fmt.WEIGHT_DTYPES}")
  if weights_format not in fmt.WEIGHT_FORMATS:
    raise ValueError(f"weights_format={weights_format!r}: choose one of {fmt.WEIGHT_FORMATS}")
  if getattr(model, "cfg", cfg) != cfg:
    raise ValueError("export_model: cfg is not the config the model was built with")
  arrays = stored_sources(parameter_sources(model, cfg), cfg, dtype, quantize)
  tokenizer = None
  if tokenizer_path is not None:
    tokenizer = _check_tokenizer(storage.as_path(tokenizer_path).read_bytes(), tokenizer_path, cfg)
  out = storage.as_path(out_dir)
  check_replaceable(out)
  temp = storage.temporary_sibling(out)
  if not storage.is_remote(out):  # object stores have no directories (and s3fs's mkdir creates buckets)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp.mkdir()
  try:
    manifest = _write_export(temp, arrays, cfg, fmt.INT8 if quantize else dtype, weights_format, tokenizer)
    if onnx:
      manifest = _write_onnx(temp, manifest)
    check_replaceable(out)  # again: something may have appeared there while the export was written
    _publish(temp, out)
  except BaseException:
    storage.remove_tree(temp, missing_ok=True)
    raise
  return manifest


def onnx_graph_module():
  """yanjax.export.onnx_graph, or ConfigError saying how to install the `onnx` package it needs."""
  try:
    from yanjax.export import onnx_graph  # pylint: disable=import-outside-toplevel  # an optional extra
  except ImportError as e:
    raise ConfigError(f"--onnx needs the onnx package ({e}): pip install -e '.[onnx]' -c constraints.txt") from e
  return onnx_graph


def _write_onnx(out: epath.Path, manifest: dict[str, Any]) -> dict[str, Any]:
  """Adds the ONNX graph of the export in `out` (its weights file written, hashed as it was) and rewrites the
  manifest listing it under "onnx" and in "files"; returns that manifest. The weights file is read back once;
  the graph is built in a local temporary directory (onnx writes local files), then copied into `out`."""
  onnx_graph = onnx_graph_module()
  stored = onnx_graph.stored_weights(out, manifest)
  with tempfile.TemporaryDirectory(prefix="yanjax-onnx-") as local:
    onnx_graph.save_graph(onnx_graph.build_graph(manifest, stored), pathlib.Path(local))
    for name in (fmt.ONNX, fmt.ONNX_DATA):
      with open(pathlib.Path(local) / name, "rb") as source, _create(out / name) as stream:
        shutil.copyfileobj(source, stream, 1 << 22)
      manifest["files"][name] = stream.entry()
  manifest["onnx"] = {"file": fmt.ONNX, "data": fmt.ONNX_DATA, "opset": onnx_graph.OPSET}
  _write_bytes(out / fmt.MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
  return manifest


def _publish(temp: epath.Path, out: epath.Path) -> None:
  """Moves the finished export `temp` to `out` (storage.replace_directory, manifest last)."""
  try:
    storage.replace_directory(temp, out, fmt.MANIFEST)
  except Exception as e:  # pylint: disable=broad-except  # gcsfs and botocore errors are not all OSErrors
    if not storage.is_remote(out):
      raise
    raise ConfigError(f"moving the export into {out} failed: {storage.describe_storage_error(e, out)}; "
                      "run the export again") from e


def _write_export(out: epath.Path, arrays: dict[str, Stored], cfg: ModelConfig, dtype: str,
                  weights_format: str, tokenizer: tokenization.Tokenizer | None) -> dict[str, Any]:
  """Writes the export's files into the (new, empty) directory `out`, the manifest last; returns it.

  `dtype` is the manifest's weights_dtype: "float32" or "bfloat16" (format 3), or "int8" (format 4)."""
  files = {}
  weights = fmt.WEIGHT_FILES[weights_format]
  version = fmt.INT8_FORMAT_VERSION if dtype == fmt.INT8 else fmt.FORMAT_VERSION
  if weights_format == "npz":
    files[weights], digests = _write_npz(out / weights, arrays)
  else:
    metadata = {"format": fmt.FORMAT, "format_version": str(version), "weights_dtype": dtype}
    files[weights], digests = _write_safetensors(out / weights, arrays, metadata)
  config = json.loads(json.dumps(cfg.to_dict()))  # as it reads back: the pattern a list
  files[fmt.CONFIG] = _write_bytes(out / fmt.CONFIG, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
  tokenizer_entry = None
  if tokenizer is not None:
    files[tokenizer.file_name] = _write_bytes(out / tokenizer.file_name, tokenizer.data)
    tokenizer_entry = {**tokenizer.metadata(), **files[tokenizer.file_name]}  # file, kind, ids, sha256, bytes

  manifest = {
      "format": fmt.FORMAT,
      "format_version": version,
      "created_by": f"yanjax {yanjax.__version__}",
      "weights_dtype": dtype,
      "weights_format": weights_format,
  }
  if dtype == fmt.INT8:
    manifest["quantization"] = dict(QUANTIZATION)
  layout = fmt.stored_arrays(config, dtype)
  manifest.update({
      "config": config,
      "arrays": [_array_entry(n, layout[n], digests[n]) for n in arrays],
      "files": files,
      "tokenizer": tokenizer_entry,
  })
  _write_bytes(out / fmt.MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
  return manifest


QUANTIZATION = {  # the manifest's "quantization" of an int8 export (docs/export.md, "int8")
    "method": "int8",
    "weights": "the arrays whose entry names a scale: int8, symmetric, one float32 scale per output channel",
    "scale": "max |w| over contraction_axes / 127",
    "rounding": "round(w / scale) to nearest, ties to even, clipped to [-127, 127]",
    "dequantize": "w = float32(q) * scale, scale broadcast over contraction_axes",
}


def _array_entry(name: str, layout: dict[str, Any], sha256: str) -> dict[str, Any]:
  """The manifest's entry of one stored array (the keys of format 3, and for int8 its scale or matrix)."""
  entry = {"name": name, "shape": list(layout["shape"]), "dtype": layout["dtype"],
           "npz_dtype": fmt.NPZ_DTYPES[layout["dtype"]], "sha256": sha256}
  if "scale" in layout:
    entry.update(scale=layout["scale"], contraction_axes=list(layout["contraction_axes"]))
  if "scale_of" in layout:
    entry["scale_of"] = layout["scale_of"]
  return entry


def check_quantize(quantize: str | None, dtype: str = "float32") -> None:
  """Raises ConfigError for an unknown quantization, or one combined with dtype="bfloat16"."""
  if quantize is not None and quantize not in QUANTIZE_METHODS:
    raise ConfigError(f"--quantize {quantize}: unknown; choose one of {', '.join(QUANTIZE_METHODS)} (or leave it "
                      "out for unquantized weights)")
  if quantize is not None and dtype != "float32":
    raise ConfigError(f"--quantize {quantize} with --dtype {dtype}: int8 scales and the arrays kept unquantized are "
                      "float32; leave out --dtype")


def _check_tokenizer(data: bytes, path, cfg: ModelConfig) -> tokenization.Tokenizer:
  """The tokenizer in `data`, refused when it produces ids the model lacks."""
  tokenizer = tokenization.from_bytes(data, str(path))
  if tokenizer.vocab_size > cfg.vocab_size:
    raise TokenizerMismatchError(f"{path}: the tokenizer has {tokenizer.vocab_size} pieces but the model's "
                                 f"vocab_size is {cfg.vocab_size}")
  return tokenizer

