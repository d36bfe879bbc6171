"""Shared building blocks: parameters with logical axis names, RMSNorm, embedding, GeGLU MLP, and the per-call
inputs every layer sees.

Shapes: the legend in docs/model.md.
Every parameter is float32 and carries logical axis names in its `out_sharding` metadata; the trainer maps
those names to mesh axes with the rules in the config (see `yanjax.training.sharding`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from yanjax.model.partitioning import constrain


class BlockInputs(NamedTuple):
  """Per-call values every layer sees (broadcast over layers); each mixer reads what it needs."""
  reset: jax.Array  # [b, t] bool: a document starts here
  segment_ids: jax.Array  # [b, t] int32, 0 = padding
  positions: jax.Array  # [b, t] int32: position in the document
  step: jax.Array | None  # training step (None: inference, no router exploration)


COMPUTE_DTYPES = ("float32", "bfloat16")  # model.dtype; parameters are always float32
REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}  # model.remat other than "none"


def param(rngs: nnx.Rngs | None, shape, axes: tuple[str | None, ...], init=None) -> nnx.Param:
  """A float32 parameter of `shape` named by logical `axes`; `init(key, shape)` or ones when rngs is None."""
  assert len(axes) == len(shape), (shape, axes)
  value = jnp.ones(shape, jnp.float32) if init is None else init(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def normal(std: float):
  return jax.nn.initializers.normal(std)


def cast(x: jax.Array, dtype) -> jax.Array:
  return x.astype(dtype) if x.dtype != dtype else x


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis, computed in float32, with a learned scale of logical `axes`."""

  def __init__(self, shape: tuple[int, ...], axes: tuple[str | None, ...], eps: float):
    self.scale = param(None, shape, axes)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...]).astype(x.dtype)


class Embed(nnx.Module):
  """Token embedding [V, D]; tied, it is also the output head (yanjax/model/head.py, `LanguageModel.output_head`)."""

  def __init__(self, vocab: int, width: int, std: float, rngs: nnx.Rngs):
    self.embedding = param(rngs, (vocab, width), ("vocab", "embed"), normal(std))

  def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
    """tokens [b, t] int -> [b, t, D] in `dtype`."""
    # The table is gathered whole (as FSDP gathers every weight): a lookup into a table split over "embed"
    # would make XLA gather the batch's token ids and activations across the data shards instead.
    table = constrain(self.embedding[...], (None, None))
    return cast(jnp.take(table, tokens, axis=0), dtype)


def geglu(x: jax.Array, gate_up: jax.Array, down: jax.Array) -> jax.Array:
  """GeGLU MLP: x [..., D], gate_up [D, 2, F], down [F, D] -> [..., D] (paper: GeGLU activation)."""
  h = jnp.einsum("...d,dkf->...kf", x, cast(gate_up, x.dtype))
  return jnp.einsum("...f,fd->...d", jax.nn.gelu(h[..., 0, :]) * h[..., 1, :], cast(down, x.dtype))


class GatedMLP(nnx.Module):
  """Dense GeGLU feed-forward block: [b, t, D] -> [b, t, D]."""

  def __init__(self, width: int, hidden: int, std: float, rngs: nnx.Rngs):
    self.gate_up = param(rngs, (width, 2, hidden), ("embed", None, "mlp"), normal(std))
    self.down = param(rngs, (hidden, width), ("mlp", "embed"), normal(std / 2))

  def __call__(self, x: jax.Array) -> jax.Array:
    return geglu(x, self.gate_up[...], self.down[...])
