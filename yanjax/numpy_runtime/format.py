"""The export format: file names, array names and shapes, and a checked loader (NumPy and the stdlib only).

An export directory holds (docs/export.md describes each array and the order of operations):

    manifest.json        format version, config, weights format, every array's name / shape / dtype / sha256,
                         file checksums
    config.json          the model config (the same mapping as manifest["config"])
    weights.npz          one array per name; float32, or bfloat16 stored as its uint16 bit pattern, or (format 4,
                         --quantize int8) int8 matrices each followed by its float32 scale `<name>.qscale`
      or
    weights.safetensors  the same arrays (F32, BF16, or I8 and F32), whichever `manifest["weights_format"]` names
    tokenizer.model      the run's tokenizer (optional): a sentencepiece model,
      or
    tokenizer.json       a Hugging Face tokenizer; `manifest["tokenizer"]` names the file and its "kind"
    model.onnx           (--onnx) the model as an ONNX graph, and model.onnx.data its weights; `manifest["onnx"]`

`load_export` checks everything it reads and raises `ExportError` naming the file, the array or the config
key at fault: a missing or unreadable file, a checksum that does not match, an array that is missing,
unexpected or of the wrong shape, and a config whose implied shapes differ from the weights.

The directory may be local or in a bucket (`gs://bucket/...`, `s3://bucket/...`); URLs are read through
`etils.epath` (imported only for them, so local use needs NumPy alone).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import zipfile
from typing import Any, NamedTuple

import numpy as np

from .mcsd import COMBINES
from .mixers import TWINS, layer_mixers, renamed_key_error
from .quantize import SCALE_SUFFIX, contraction_axes, dequantize_int8, scale_shape

FORMAT = "yanjax-export"
FORMAT_VERSION = 3  # 3: the config names every layer's mixer by `pattern` (a list of names in mixers.py, repeated)
INT8_FORMAT_VERSION = 4  # 4: format 3 with int8 projection matrices and their float32 scales (quantize.py)
SUPPORTED_VERSIONS = (FORMAT_VERSION, INT8_FORMAT_VERSION)  # float32 and bfloat16 exports stay version 3
OLD_VERSIONS = {  # what an older format differs by
    1: "it names the one mixer config.arch ('yan' | 'attention')",
    2: "it names the one mixer config.mixer ('mcsd' | 'mcsd_dd' | 'attention'), since replaced by the layer "
       "pattern config.pattern",
}
MANIFEST = "manifest.json"
CONFIG = "config.json"
NPZ = "weights.npz"
SAFETENSORS = "weights.safetensors"
ONNX = "model.onnx"  # --onnx: the graph for ONNX Runtime (yanjax/export/onnx_graph.py; docs/export.md, "ONNX")
ONNX_DATA = "model.onnx.data"  # its weights, ONNX external data (a graph over 2 GB cannot hold them inline)
WEIGHT_DTYPES = ("float32", "bfloat16")  # --dtype: what every array is stored as (format 3)
INT8 = "int8"  # manifest weights_dtype of a --quantize int8 export (format 4): int8 matrices, float32 the rest
STORED_DTYPES = {"float32": np.dtype("<f4"), "bfloat16": np.dtype("<u2"), "int8": np.dtype("i1")}  # as stored
NPZ_DTYPES = {"float32": "float32", "bfloat16": "uint16", "int8": "int8"}  # manifest npz_dtype of each dtype
WEIGHT_FILES = {"npz": NPZ, "safetensors": SAFETENSORS}  # weights format -> the file an export holds
WEIGHT_FORMATS = tuple(WEIGHT_FILES)
# Config keys the runtime reads; the others (training and kernel choices) do not change inference results.
RUNTIME_KEYS = ("pattern", "vocab_size", "width", "layers", "mlp_width", "channels", "combine", "learnable_rates",
                "include_current", "heads", "rope_theta", "max_decode_len", "window", "router", "groups", "top_k",
                "router_hidden", "tie_embeddings", "norm_eps")


class ExportError(ValueError):
  """An export directory is missing a file, holds a corrupt one, or its config does not fit its weights."""


class Export(NamedTuple):
  """A loaded, checked export (paths: pathlib.Path, or etils.epath.Path for a URL)."""
  path: Any
  config: dict[str, Any]
  arrays: dict[str, np.ndarray]  # name -> float32 array, in the canonical order of `expected_shapes`
  manifest: dict[str, Any]
  tokenizer_path: Any  # the file manifest["tokenizer"] names; None when the export has no tokenizer


URL_SCHEMES = ("gs://", "s3://")


def as_path(path) -> Any:
  """pathlib.Path of a local path; etils.epath.Path of a gs:// or s3:// URL (or of an epath given)."""
  text = str(path)
  if text.startswith(URL_SCHEMES):
    from etils import epath  # pylint: disable=import-outside-toplevel  # only for buckets
    return path if isinstance(path, epath.Path) else epath.Path(text)
  return pathlib.Path(path)


def sha256_file(path) -> str:
  digest = hashlib.sha256()
  with as_path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def array_sha256(stored: np.ndarray) -> str:
  """sha256 of an array's bytes as stored: C order, little endian (float32, or uint16 bf16 bit patterns).

  Copy-free when the array is already C-contiguous little endian, as the exporter's and readers' arrays are.
  """
  stored = np.ascontiguousarray(stored, stored.dtype.newbyteorder("<"))
  return hashlib.sha256(stored.data).hexdigest()  # the buffer itself, not a copy


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
  """uint16 bfloat16 bit patterns -> float32 (exact: bf16 is the top half of a float32)."""
  return (bits.astype(np.uint32) << 16).view(np.float32)


def stored_to_float32(stored: np.ndarray, dtype: str) -> np.ndarray:
  """A float32 or bfloat16 array as stored (bfloat16: uint16 bit patterns) -> float32."""
  return bf16_bits_to_float32(stored) if dtype == "bfloat16" else stored.astype(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
  """float32 -> uint16 bfloat16 bit patterns, rounding to nearest even (NaN stays NaN)."""
  bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
  rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
  return np.where(np.isnan(x), (bits >> 16) | 0x40, rounded).astype(np.uint16)


# ---- names and shapes -------------------------------------------------------------------------------

def check_config(config: dict[str, Any], where: str = CONFIG) -> dict[str, Any]:
  """The config restricted to the keys the runtime reads, with types checked (`pattern` as a tuple); errors name
  the key."""
  if not isinstance(config, dict):
    raise ExportError(f"{where}: the config must be a JSON object, got {type(config).__name__}")
  for old in ("arch", "mixer"):
    if old in config:
      raise ExportError(f"{where}: config {renamed_key_error(old, config[old])}")
  missing = [k for k in RUNTIME_KEYS if k not in config]
  if missing:
    raise ExportError(f"{where}: config key(s) {missing} missing")
  c = {k: config[k] for k in RUNTIME_KEYS}
  pattern = c["pattern"]
  if not (isinstance(pattern, (list, tuple)) and pattern and all(name in TWINS for name in pattern)):
    raise ExportError(f"{where}: config pattern={pattern!r} must be a non-empty list of mixer names from "
                      f"{tuple(TWINS)}")
  c["pattern"] = tuple(pattern)
  if c["combine"] not in COMBINES:
    raise ExportError(f"{where}: config combine={c['combine']!r} must be one of {COMBINES}")
  for key in ("vocab_size", "width", "layers", "mlp_width", "channels", "heads", "max_decode_len", "window",
              "groups", "top_k", "router_hidden"):
    if not isinstance(c[key], int) or isinstance(c[key], bool) or c[key] <= 0:
      raise ExportError(f"{where}: config {key}={c[key]!r} must be a positive integer")
  for key in ("learnable_rates", "include_current", "router", "tie_embeddings"):
    if not isinstance(c[key], bool):
      raise ExportError(f"{where}: config {key}={c[key]!r} must be true or false")
  for key in ("rope_theta", "norm_eps"):
    if not isinstance(c[key], (int, float)) or not c[key] > 0:
      raise ExportError(f"{where}: config {key}={c[key]!r} must be a positive number")
  if c["layers"] % len(c["pattern"]):
    raise ExportError(f"{where}: config pattern={list(c['pattern'])!r}: its length {len(c['pattern'])} must divide "
                      f"layers={c['layers']}")
  for name in dict.fromkeys(c["pattern"]):
    problem = TWINS[name].check(c)
    if problem:
      key, why = problem
      raise ExportError(f"{where}: config {key}={c[key]!r}: {why}")
  if c["router"] and (c["mlp_width"] % c["groups"] or c["top_k"] > c["groups"]):
    raise ExportError(f"{where}: config router needs mlp_width % groups == 0 and top_k <= groups "
                      f"(mlp_width={c['mlp_width']}, groups={c['groups']}, top_k={c['top_k']})")
  return c


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """Every array a config implies, name -> shape, in canonical order (the order the forward pass uses them).

  D = width, V = vocab_size, F = mlp_width, E = groups, g = F / E, R = router_hidden; layer i's mixer arrays are the
  `shapes` of the twin of its mixer, pattern[i % len(pattern)] (mixers.py).
  """
  c = check_config(config)
  d, v = c["width"], c["vocab_size"]
  shapes: dict[str, tuple[int, ...]] = {"embed.embedding": (v, d)}
  for i, mixer in enumerate(layer_mixers(c["pattern"], c["layers"])):
    p = f"blocks.{i}."
    shapes[p + "mixer_norm.scale"] = (d,)
    shapes.update({p + "mixer." + name: shape for name, shape in TWINS[mixer].shapes(c).items()})
    shapes[p + "ffn_norm.scale"] = (d,)
    if c["router"]:
      e, g = c["groups"], c["mlp_width"] // c["groups"]
      shapes[p + "ffn.router_in"] = (d, c["router_hidden"])
      shapes[p + "ffn.router_out"] = (c["router_hidden"], e)
      shapes[p + "ffn.gate_up"] = (e, d, 2, g)
      shapes[p + "ffn.down"] = (e, g, d)
    else:
      shapes[p + "ffn.gate_up"] = (d, 2, c["mlp_width"])
      shapes[p + "ffn.down"] = (c["mlp_width"], d)
  shapes["final_norm.scale"] = (d,)
  if not c["tie_embeddings"]:
    shapes["head"] = (d, v)
  return shapes


def check_arrays_fit_config(shapes: dict[str, tuple[int, ...]], config: dict[str, Any],
                            where: str) -> None:
  """Raises ExportError naming the first array that the config does not imply or implies differently."""
  expected = expected_shapes(config)
  summary = ", ".join(f"{k}={config[k]}" for k in ("pattern", "width", "layers", "vocab_size"))
  for name, shape in expected.items():
    if name not in shapes:
      raise ExportError(f"{where}: array '{name}' {list(shape)} is implied by the config ({summary}) but "
                        f"missing from the weights; the config does not match the weights")
    if tuple(shapes[name]) != shape:
      raise ExportError(f"{where}: array '{name}' has shape {list(shapes[name])} but the config ({summary}) "
                        f"implies {list(shape)}; the config does not match the weights")
  extra = [n for n in shapes if n not in expected]
  if extra:
    raise ExportError(f"{where}: array(s) {extra} are not implied by the config ({summary}); the config "
                      f"does not match the weights")


def stored_arrays(config: dict[str, Any], weights_dtype: str) -> dict[str, dict[str, Any]]:
  """Every array an export with this config and weights_dtype stores, in canonical order: name -> {"shape",
  "dtype"} and, for an int8 matrix, "scale" (its scale array's name) and "contraction_axes"; for a scale,
  "scale_of".

  weights_dtype "float32" or "bfloat16": the arrays of `expected_shapes`, all of that dtype. "int8": each array
  that quantize.CONTRACTION_AXES lists is int8 and followed by its float32 scale `<name>.qscale`; the others
  are float32.
  """
  stored: dict[str, dict[str, Any]] = {}
  for name, shape in expected_shapes(config).items():
    axes = contraction_axes(name, shape) if weights_dtype == INT8 else None
    if axes is None:
      stored[name] = {"shape": shape, "dtype": "float32" if weights_dtype == INT8 else weights_dtype}
    else:
      scale = name + SCALE_SUFFIX
      stored[name] = {"shape": shape, "dtype": INT8, "scale": scale, "contraction_axes": axes}
      stored[scale] = {"shape": scale_shape(shape, axes), "dtype": "float32", "scale_of": name}
  return stored


# ---- reading ----------------------------------------------------------------------------------------

def _read_json(path) -> Any:
  if not path.is_file():
    raise ExportError(f"{path}: file missing")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ExportError(f"{path}: not readable JSON ({e})") from e


def _check_file(path, entry: dict[str, Any]) -> None:
  if not path.is_file():
    raise ExportError(f"{path}: file missing (listed in {MANIFEST})")
  if sha256_file(path) != entry["sha256"]:
    raise ExportError(f"{path}: sha256 does not match {MANIFEST}: the file is corrupt or was changed")


def read_npz(path) -> dict[str, np.ndarray]:
  """Every array of an .npz file (local path or URL) as stored; errors name the file and, where known, the
  array."""
  path = as_path(path)
  if not path.is_file():
    raise ExportError(f"{path}: file missing")
  stream = path.open("rb")
  try:
    archive = np.load(stream, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    stream.close()
    raise ExportError(f"{path}: not a readable .npz file ({e})") from e
  arrays = {}
  with stream, archive:
    for name in archive.files:
      try:
        arrays[name] = archive[name]
      except Exception as e:  # zip CRC errors, truncated members, bad .npy headers
        raise ExportError(f"{path}: array '{name}' is unreadable ({type(e).__name__}: {e})") from e
  return arrays


_SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "BF16": np.dtype("<u2"), "I8": np.dtype("i1")}


def read_safetensors(path) -> dict[str, np.ndarray]:
  """Every array of a .safetensors file (local path or URL; F32, I8, or BF16 returned as uint16 bit patterns),
  in pure NumPy.

  Layout: 8 bytes little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets}},
  then the data; offsets are relative to the end of the header.
  """
  path = as_path(path)
  if not path.is_file():
    raise ExportError(f"{path}: file missing")
  data = path.read_bytes()
  try:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ExportError(f"{path}: unreadable safetensors header ({e})") from e
  body = memoryview(data)[8 + n:]
  arrays = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info.get("dtype") not in _SAFETENSORS_DTYPES:
      raise ExportError(f"{path}: array '{name}' has dtype {info.get('dtype')!r}; expected F32, BF16 or I8")
    start, end = info["data_offsets"]
    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    if end > len(body) or end - start != dtype.itemsize * int(np.prod(info["shape"], dtype=np.int64)):
      raise ExportError(f"{path}: array '{name}' data lies outside the file or has the wrong size "
                        f"(file truncated or corrupt)")
    arrays[name] = np.frombuffer(body[start:end], dtype).reshape(info["shape"]).copy()
  return arrays


def load_export(path, *, weights: str | None = None, verify: bool = True) -> Export:
  """Loads an export directory and checks it; returns float32 arrays whatever the stored dtype.

  Args:
    path: the export directory: a local path, or a gs:// or s3:// URL.
    weights: the weights format to read, one of WEIGHT_FORMATS; None (default): the one the export holds
      (`manifest["weights_format"]`). Asking for another raises ExportError.
    verify: check the sha256 of the config, the tokenizer and every array against the manifest.
  Raises:
    ExportError naming the file, array or config key at fault.
  """
  root = as_path(path)
  if not root.is_dir():
    raise ExportError(f"{root}: export directory missing")
  manifest = _read_json(root / MANIFEST)
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ExportError(f"{root / MANIFEST}: not a {FORMAT} manifest")
  version = manifest.get("format_version")
  if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
    if isinstance(version, int) and version in OLD_VERSIONS:
      why = f": {OLD_VERSIONS[version]}; read it with the yanjax that wrote it, or export its run again"
    elif isinstance(version, int) and version > max(SUPPORTED_VERSIONS):
      why = ": a newer yanjax wrote it; read it with that version"
    else:
      why = ""
    supported = " or ".join(map(str, SUPPORTED_VERSIONS))
    raise ExportError(f"{root / MANIFEST}: format_version {version!r} is not the supported {supported}{why}")
  for key in ("config", "weights_dtype", "weights_format", "arrays", "files"):
    if key not in manifest:
      raise ExportError(f"{root / MANIFEST}: key '{key}' missing")
  dtypes = (INT8,) if version == INT8_FORMAT_VERSION else WEIGHT_DTYPES
  if manifest["weights_dtype"] not in dtypes:
    raise ExportError(f"{root / MANIFEST}: weights_dtype {manifest['weights_dtype']!r} is not one of format_version "
                      f"{version}'s {dtypes}")
  held = manifest["weights_format"]
  if held not in WEIGHT_FORMATS:
    raise ExportError(f"{root / MANIFEST}: weights_format {held!r} not in {WEIGHT_FORMATS}")
  if weights is not None and weights not in WEIGHT_FORMATS:
    raise ValueError(f"weights={weights!r}: choose one of {WEIGHT_FORMATS}, or None for the export's own")
  if weights not in (None, held):
    raise ExportError(f"{root}: holds {WEIGHT_FILES[held]} only, not {WEIGHT_FILES[weights]}; export again "
                      f"with --format {weights}")

  config = _read_json(root / CONFIG)
  if verify and CONFIG in manifest["files"]:
    _check_file(root / CONFIG, manifest["files"][CONFIG])
  if config != manifest["config"]:
    differ = sorted(k for k in set(config) | set(manifest["config"]) if config.get(k) != manifest["config"].get(k))
    raise ExportError(f"{root / CONFIG}: differs from the config in {MANIFEST} in key(s) {differ}")
  check_config(config, str(root / CONFIG))
  listed = {a["name"]: a for a in manifest["arrays"]}
  layout = stored_arrays(config, manifest["weights_dtype"])
  check_arrays_fit_config({n: a["shape"] for n, a in listed.items() if "scale_of" not in layout.get(n, {})},
                          config, f"{root / CONFIG} vs {root / MANIFEST}")
  for name, expected in layout.items():
    if name not in listed:
      raise ExportError(f"{root / MANIFEST}: array '{name}' (the int8 scale of '{expected['scale_of']}') is not "
                        "listed")
    _check_entry(name, listed[name], expected, root / MANIFEST)
  file = root / WEIGHT_FILES[held]
  stored = read_npz(file) if held == "npz" else read_safetensors(file)
  for name, entry in listed.items():
    if name not in stored:
      raise ExportError(f"{file}: array '{name}' missing (listed in {MANIFEST})")
    a, want_dtype = stored[name], STORED_DTYPES[entry["dtype"]]
    if a.dtype != want_dtype or list(a.shape) != list(entry["shape"]):
      raise ExportError(f"{file}: array '{name}' is {a.dtype} {list(a.shape)} but {MANIFEST} says "
                        f"{entry['dtype']} {entry['shape']} (stored as {want_dtype})")
    if verify and array_sha256(a) != entry["sha256"]:
      raise ExportError(f"{file}: array '{name}' fails its sha256 check: the file is corrupt or was changed")
  extra = sorted(set(stored) - set(listed))
  if extra:
    raise ExportError(f"{file}: array(s) {extra} not listed in {MANIFEST}")
  arrays = {}  # float32, whatever the stored dtype: bf16 upcast, int8 dequantized
  for name, entry in layout.items():
    if entry["dtype"] == INT8:
      arrays[name] = dequantize_int8(stored[name], stored[entry["scale"]], entry["contraction_axes"])
    elif "scale_of" not in entry:
      arrays[name] = stored_to_float32(stored[name], entry["dtype"])

  tokenizer = None
  if manifest.get("tokenizer"):
    tokenizer = root / manifest["tokenizer"]["file"]
    if verify:
      _check_file(tokenizer, manifest["tokenizer"])
    elif not tokenizer.is_file():
      raise ExportError(f"{tokenizer}: file missing (listed in {MANIFEST})")
  return Export(root, config, arrays, manifest, tokenizer)


def _check_entry(name: str, entry: dict[str, Any], expected: dict[str, Any] | None, where) -> None:
  """Raises ExportError unless the manifest's entry for array `name` is what the config and weights_dtype imply
  (`stored_arrays`): its shape, dtype and npz_dtype, and for int8 its scale's name and axes
  (quantize.CONTRACTION_AXES)."""
  if list(entry["shape"]) != list(expected["shape"]):
    raise ExportError(f"{where}: array '{name}' has shape {entry['shape']} but {list(expected['shape'])} is implied")
  dtype = entry.get("dtype")
  if dtype != expected["dtype"] or entry.get("npz_dtype") != NPZ_DTYPES.get(dtype):
    raise ExportError(f"{where}: array '{name}' is listed as {dtype!r} (npz_dtype {entry.get('npz_dtype')!r}) but "
                      f"the export's weights_dtype stores it as {expected['dtype']!r}")
  for key in ("scale", "contraction_axes", "scale_of"):
    want = expected.get(key)
    got = entry.get(key)
    if (list(want) if isinstance(want, tuple) else want) != got:
      raise ExportError(f"{where}: array '{name}' has {key}={got!r} but the int8 layout (quantize.py) implies "
                        f"{want!r}")
