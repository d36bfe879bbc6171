"""Weight-only int8 quantization of an export: which arrays, along which axes, and the arithmetic (NumPy only).

The 2-D+ projection matrices (every mixer's and FFN's, the embedding and the untied head) are stored as int8 with
one float32 scale per output channel; everything else (rates, the data-dependent decay gate, norms, the router)
stays float32, and every computation stays float32 (docs/export.md, "int8"). One table, `CONTRACTION_AXES`,
says which arrays are quantized and which of their axes a matmul sums over; the other axes are output channels,
and each output channel gets its own scale.

Shapes: the legend in docs/model.md.
"""

from __future__ import annotations

import fnmatch

import numpy as np

QUANTIZE_METHODS = ("int8",)  # --quantize values; None: no quantization
SCALE_SUFFIX = ".qscale"  # the scale array of `name` is `name + SCALE_SUFFIX`
QMAX = 127  # symmetric: int8 values in [-127, 127] (-128 is never written)

# (export name pattern, rank of the array) -> the axes a matmul contracts (sums over). One scale per index of the
# remaining axes (the output channels). Arrays not listed stay float32. A new mixer's projection matrices need
# a line here.
CONTRACTION_AXES: dict[tuple[str, int], tuple[int, ...]] = {
    ("embed.embedding", 2): (1,),  # [V, D]: one scale per token (row); also the tied head's per-output scale
    ("head", 2): (0,),  # [D, V]: one scale per vocabulary column
    ("blocks.*.mixer.proj", 4): (1,),  # mcsd, mcsd_dd [C, Dc, 4, Dc]: scale [C, 4, Dc]
    ("blocks.*.mixer.out", 4): (0, 1, 2),  # mcsd, mcsd_dd concat [2, C, Dc, D]: scale [D]
    ("blocks.*.mixer.qkv", 4): (0,),  # attention, swa [D, 3, H, Dh]: scale [3, H, Dh]
    ("blocks.*.mixer.out", 3): (0, 1),  # attention, swa [H, Dh, D]: scale [D]
    ("blocks.*.ffn.gate_up", 3): (0,),  # GeGLU [D, 2, F]: scale [2, F]
    ("blocks.*.ffn.down", 2): (0,),  # GeGLU [F, D]: scale [D]
    ("blocks.*.ffn.gate_up", 4): (1,),  # selective [E, D, 2, g]: scale [E, 2, g]
    ("blocks.*.ffn.down", 3): (1,),  # selective [E, g, D]: scale [E, D]
}


def contraction_axes(name: str, shape) -> tuple[int, ...] | None:
  """The axes of array `name` (of `shape`) that its int8 scale reduces over, or None when it stays float32."""
  for (pattern, rank), axes in CONTRACTION_AXES.items():
    if len(shape) == rank and fnmatch.fnmatchcase(name, pattern):
      return axes
  return None


def scale_shape(shape, axes) -> tuple[int, ...]:
  """The shape of the scale array: the weight's shape without the contraction axes."""
  return tuple(n for i, n in enumerate(shape) if i not in axes)


def quantize_int8(w: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """float32 w -> (q int8 of w's shape, scale float32 of `scale_shape`), in float32 arithmetic:

      scale = max |w| over `axes` / 127
      q = clip(round_half_to_even(w / scale), -127, 127)   (q = 0 where scale = 0: an all-zero channel)
  """
  w = np.asarray(w, np.float32)
  scale = (np.max(np.abs(w), axis=axes, keepdims=True) / np.float32(QMAX)).astype(np.float32)
  safe = np.where(scale > 0, scale, np.float32(1))
  q = np.clip(np.rint(w / safe), -QMAX, QMAX).astype(np.int8)
  return np.ascontiguousarray(q), np.ascontiguousarray(np.squeeze(scale, axis=axes))


def dequantize_int8(q: np.ndarray, scale: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
  """float32 w = float32(q) * scale, the scale broadcast over the contraction `axes`."""
  return (q.astype(np.float32) * np.expand_dims(np.asarray(scale, np.float32), axes)).astype(np.float32)
