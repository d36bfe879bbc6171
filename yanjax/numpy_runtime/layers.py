"""Shared NumPy building blocks: the JAX model's elementwise functions, RMSNorm, GeGLU, and the per-call inputs.

Everything is float32. Shapes: the legend in docs/model.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

F32 = np.float32


class BlockInputs(NamedTuple):
  """Per-call values every layer's mixer sees (the JAX model's `yanjax.model.layers.BlockInputs`)."""
  reset: np.ndarray  # [b, t] bool: a document starts here
  segment_ids: np.ndarray  # [b, t] int, 0 = padding
  positions: np.ndarray  # [b, t] int: position in the document


def sigmoid(x):
  return (0.5 * (np.tanh(0.5 * x) + 1.0)).astype(F32)


def silu(x):
  return (x * sigmoid(x)).astype(F32)


def softplus(x):
  """log(1 + exp(x)), computed without overflow (jax.nn.softplus)."""
  return np.logaddexp(x, F32(0)).astype(F32)


def gelu(x):
  """tanh-approximated GELU (jax.nn.gelu's default): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
  return (0.5 * x * (1.0 + np.tanh(F32(np.sqrt(2.0 / np.pi)) * (x + F32(0.044715) * (x * x * x))))).astype(F32)


def softmax(x, axis=-1):
  e = np.exp(x - np.max(x, axis=axis, keepdims=True))
  return (e / np.sum(e, axis=axis, keepdims=True)).astype(F32)


def rms_norm(x, scale, eps):
  """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * scale."""
  return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + F32(eps)) * scale).astype(F32)


def geglu(x, gate_up, down):
  """x [..., D], gate_up [D, 2, F], down [F, D]: (gelu(x W_gate) * (x W_up)) W_down, as two BLAS products."""
  h = (x @ gate_up.reshape(gate_up.shape[0], -1)).reshape(*x.shape[:-1], 2, -1)  # [..., 2, F]
  return ((gelu(h[..., 0, :]) * h[..., 1, :]) @ down).astype(F32)
