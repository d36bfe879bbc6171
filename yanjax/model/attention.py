"""LLaMA-style causal self-attention with RoPE and a KV cache: the Transformer baseline's mixer.

Shapes: the legend in docs/model.md (t: query time, s: key time or cache slot).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from yanjax.model import attention_kernel, layers
from yanjax.model.config import ModelConfig
from yanjax.model.partitioning import Term, constrain, length_ways

KEYS_AXES = ("batch", None, "heads", None)  # keys and values [b, s, H, Dh] that every query of a split sequence sees


class KVCache(NamedTuple):
  """Decode state of one attention block: grows with the context (s = cfg.max_decode_len slots)."""
  k: jax.Array  # [b, s, H, Dh] compute dtype
  v: jax.Array  # [b, s, H, Dh]
  index: jax.Array  # [b] int32: slots filled so far


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding: x [b, t, H, Dh], positions [b, t] -> [b, t, H, Dh] (rotate-half convention)."""
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[..., None, None].astype(jnp.float32) * freq  # [b, t, 1, Dh / 2]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _write(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """Writes new [b, t, ...] into cache [b, s, ...] at each row's own index [b]."""
  return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=0))(cache, new, index)


class Attention(nnx.Module):
  """Causal multi-head self-attention: [b, t, D] -> [b, t, D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    h, dh = cfg.heads, cfg.head_dim
    self.qkv = layers.param(rngs, (cfg.width, 3, h, dh), ("embed", None, "heads", None),
                            layers.normal(cfg.init_std))
    self.out = layers.param(rngs, (h, dh, cfg.width), ("heads", None, "embed"), layers.normal(cfg.init_std / 2))

  def init_cache(self, batch: int, dtype) -> KVCache:
    """An empty cache of max_decode_len slots, keys and values in the compute `dtype`."""
    shape = (batch, self.cfg.max_decode_len, self.cfg.heads, self.cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

  def __call__(self, x: jax.Array, inputs: layers.BlockInputs, cache: KVCache | None = None
               ) -> tuple[jax.Array, KVCache | None]:
    """x [b, t, D] -> (y [b, t, D], cache after x or None); RoPE at `inputs.positions`.

    Without a cache a query sees earlier keys of its own segment (`inputs.segment_ids`: packed documents stay
    apart), by cuDNN's flash attention or XLA (`model.attention_kernel`, yanjax/model/attention_kernel.py); with a
    cache the call continues one document from the cache's slots (prefill or one decode step), on XLA.
    """
    q, k, v = self.project_in(x, inputs.positions)
    t = x.shape[1]
    if cache is None and self.kernel(q) == "cudnn":
      return self.project_out(attention_kernel.fused_attention(q, k, v, inputs.segment_ids)), None
    if cache is None:
      k, v = self.gather_keys(k, v)
      causal = jnp.tril(jnp.ones((t, t), bool))
      segment_ids = inputs.segment_ids
      mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    else:
      cache = KVCache(_write(cache.k, k.astype(cache.k.dtype), cache.index),
                      _write(cache.v, v.astype(cache.v.dtype), cache.index), cache.index + t)
      query_slot = cache.index[:, None] - t + jnp.arange(t)  # [b, t]
      key_slot = jnp.arange(cache.k.shape[1])
      mask = key_slot[None, None, :] <= query_slot[:, :, None]
      k, v = cache.k.astype(x.dtype), cache.v.astype(x.dtype)
    attended = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    return self.project_out(attended), cache

  def kernel(self, q: jax.Array) -> str:
    """The implementation ("cudnn" or "xla") of a pass without cache over queries q [b, t, H, Dh]
    (yanjax.model.attention_kernel.choose)."""
    t = q.shape[1]
    return attention_kernel.choose(self.cfg.attention_kernel, q.dtype, q.shape[-1], t, length_ways(t))

  @staticmethod
  def gather_keys(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """k, v [b, t, H, Dh], whole on every device when the sequence's time is split over devices (sequence
    parallelism: each device's queries, its segment of t, attend to every earlier key: an all-gather)."""
    if length_ways(k.shape[1]) == 1:
      return k, v
    return constrain(k, KEYS_AXES), constrain(v, KEYS_AXES)

  def project_in(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [b, t, D], positions [b, t] -> q, k, v [b, t, H, Dh], q and k rotated (RoPE) to their positions."""
    q, k, v = jnp.unstack(jnp.einsum("btd,dkhe->kbthe", x, layers.cast(self.qkv[...], x.dtype)))
    return rope(q, positions, self.cfg.rope_theta), rope(k, positions, self.cfg.rope_theta), v

  def project_out(self, attended: jax.Array) -> jax.Array:
    """The heads' output projection: attended [b, t, H, Dh] -> y [b, t, D]."""
    return jnp.einsum("bthe,hed->btd", attended, layers.cast(self.out[...], attended.dtype))

  @staticmethod
  def residual_terms(cfg: ModelConfig, t: int, itemsize: int) -> list[Term]:
    """What autodiff keeps of one block for its backward without remat, per token (yanjax.training.plan, which sets
    `cfg.attention_kernel` to what the target device runs): XLA's logits and probabilities, or cuDNN's softmax
    statistics and the document mask, grow with the sequence length `t`."""
    terms = [Term("q, k, v, attended", (cfg.heads, cfg.head_dim), ("heads", None), itemsize, 4),
             Term("attention input, output", (cfg.width,), ("embed",), itemsize, 2)]
    if cfg.attention_kernel == "cudnn":
      return terms + [Term("softmax statistics (float32)", (cfg.heads,), ("heads",), 4),
                      Term("document mask [b, 1, t, t] (bool)", (t,), (None,), 1)]
    return terms + [Term("attention logits (float32)", (cfg.heads, t), ("heads", None), 4),
                    Term("attention probabilities", (cfg.heads, t), ("heads", None), itemsize)]

  @staticmethod
  def backward_terms(cfg: ModelConfig, t: int) -> list[Term]:
    """What its backward holds beyond the residuals, per token: XLA's logits cotangent; cuDNN's, the document mask's
    cotangent, which jax 0.11 computes though nothing uses it (yanjax/model/attention_kernel.py)."""
    if cfg.attention_kernel == "cudnn":
      return [Term("document mask cotangent", (t,), (None,), jnp.dtype(cfg.dtype).itemsize)]
    return [Term("attention logits cotangent", (cfg.heads, t), ("heads", None), 4)]
