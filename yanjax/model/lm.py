"""The language model: embedding, L pre-norm residual layers, final norm, output head.

Each layer is  x = x + Mixer(RMSNorm(x));  x = x + FFN(RMSNorm(x))  (paper section 2.1), where Mixer is the
registered mixer `cfg.mixer` (yanjax/numpy_runtime/mixers.py: MCSD or causal attention), and FFN is the dense
GeGLU MLP or the selective-activation FFN (router=True). One code path serves training (`__call__`), prompt
prefill (`prefill`) and decoding (`decode_step`): a decode step is a forward pass of one token that starts from
the cache.

Shapes: the legend in docs/model.md.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from yanjax.model import layers
from yanjax.model.config import ModelConfig
from yanjax.model.partitioning import constrain
from yanjax.model.selective import SelectiveFFN
from yanjax.numpy_runtime.mixers import model_class

ACTIVATION_AXES = ("batch", "length", "embed")  # logical names of the residual stream [b, t, D]


class ModelCache(NamedTuple):
  """Decode state of the whole model."""
  layers: Any  # per-layer caches: a list, or one pytree stacked over L when layers are scanned
  position: jax.Array  # [b] int32: tokens consumed so far (the next token's position)


class Block(nnx.Module):
  """One pre-norm residual layer: [b, t, D] -> [b, t, D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.mixer_norm = layers.RMSNorm((cfg.width,), ("embed",), cfg.norm_eps)
    self.mixer = model_class(cfg.mixer)(cfg, rngs=rngs)
    self.ffn_norm = layers.RMSNorm((cfg.width,), ("embed",), cfg.norm_eps)
    if cfg.router:
      self.ffn = SelectiveFFN(cfg, rngs=rngs)
    else:
      self.ffn = layers.GatedMLP(cfg.width, cfg.mlp_width, cfg.init_std, rngs)

  def init_cache(self, batch: int):
    return self.mixer.init_cache(batch, jnp.dtype(self.cfg.dtype))

  def __call__(self, x, inputs: layers.BlockInputs, cache, key):
    """x [b, t, D] -> (x, cache, aux_loss scalar, RouterStats or None)."""
    h, cache = self.mixer(self.mixer_norm(x), inputs, cache)
    x = x + h
    h = self.ffn_norm(x)
    if self.cfg.router:
      h, stats = self.ffn(h, step=inputs.step, key=key, mask=inputs.segment_ids != 0)
      aux_loss = self.cfg.lb_loss_weight * stats.lb_loss + self.cfg.router_z_loss_weight * stats.z_loss
    else:
      h, stats, aux_loss = self.ffn(h), None, jnp.zeros((), jnp.float32)
    return constrain(x + h, ACTIVATION_AXES), cache, aux_loss, stats


def _apply(block: Block, x, inputs, cache, key):
  return block(x, inputs, cache, key)


class LanguageModel(nnx.Module):
  """Yan (MCSD) or attention-baseline language model."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = layers.Embed(cfg.vocab_size, cfg.width, cfg.init_std, rngs)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_blocks(rngs):
        return Block(cfg, rngs=rngs)
      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.layers)])
    self.final_norm = layers.RMSNorm((cfg.width,), ("embed",), cfg.norm_eps)
    if not cfg.tie_embeddings:
      self.head = layers.param(rngs, (cfg.width, cfg.vocab_size), ("embed", "vocab"),
                               layers.normal(cfg.init_std))

  # ---- public entry points -------------------------------------------------------------------------

  def __call__(self, tokens, segment_ids=None, positions=None, *, step=None, key=None):
    """Training / scoring pass over (possibly packed) sequences.

    Args:
      tokens: [b, t] int32.
      segment_ids: [b, t] int32 document ids (1, 2, ... per row; 0 = padding); None = one document per row.
      positions: [b, t] int32 position within the document; None = 0..t-1.
      step: training step for the router's exploration schedule (None: no exploration).
      key: PRNG key for router exploration.
    Returns:
      (logits [b, t, V] float32, aux) with aux = {"aux_loss": weighted router losses summed over layers,
      "router": RouterStats stacked over layers, or None without a router}.
    """
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, aux, _ = self._run(tokens, segment_ids, positions, None, step, key)
    return logits, aux

  def init_cache(self, batch: int) -> ModelCache:
    if self.cfg.scan_layers:
      caches = nnx.vmap(lambda blk: blk.init_cache(batch), in_axes=0, out_axes=0)(self.blocks)
    else:
      caches = [blk.init_cache(batch) for blk in self.blocks]
    return ModelCache(caches, jnp.zeros((batch,), jnp.int32))

  def prefill(self, tokens, cache: ModelCache):
    """Continues one document per row from `cache`: tokens [b, t] -> (logits [b, t, V], new cache)."""
    positions = cache.position[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    segment_ids = jnp.ones(tokens.shape, jnp.int32)
    logits, _, layer_caches = self._run(tokens, segment_ids, positions, cache.layers, None, None)
    return logits, ModelCache(layer_caches, cache.position + tokens.shape[1])

  def decode_step(self, cache: ModelCache, tokens):
    """One token per row: tokens [b] -> (logits [b, V], new cache)."""
    logits, cache = self.prefill(tokens[:, None], cache)
    return logits[:, 0], cache

  # ---- internals -----------------------------------------------------------------------------------

  def _run(self, tokens, segment_ids, positions, caches, step, key):
    cfg = self.cfg
    x = constrain(self.embed(tokens, jnp.dtype(cfg.dtype)), ACTIVATION_AXES)
    reset = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
    inputs = layers.BlockInputs(reset, segment_ids, positions, step)
    keys = jax.random.split(key, cfg.layers) if key is not None else None
    apply = _apply if cfg.remat == "none" else nnx.remat(_apply, policy=layers.REMAT_POLICIES[cfg.remat])
    if cfg.scan_layers:
      x, caches, aux_losses, stats = self._scan(apply, x, inputs, caches, keys)
      aux_loss = jnp.sum(aux_losses)
    else:
      per_layer = []
      new_caches = []
      for i, block in enumerate(self.blocks):
        x, cache, aux_loss, layer_stats = apply(block, x, inputs, None if caches is None else caches[i],
                                                None if keys is None else keys[i])
        per_layer.append((aux_loss, layer_stats))
        new_caches.append(cache)
      caches = new_caches
      aux_loss = sum(a for a, _ in per_layer)
      stats = None if not cfg.router else jax.tree.map(lambda *s: jnp.stack(s), *[s for _, s in per_layer])
    x = self.final_norm(x)
    if cfg.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = jnp.einsum("btd,dv->btv", x, layers.cast(self.head[...], x.dtype),
                          preferred_element_type=jnp.float32)
    logits = constrain(logits, ("batch", "length", "vocab"))
    return logits, {"aux_loss": aux_loss, "router": stats}, caches

  def _scan(self, apply, x, inputs, caches, keys):
    @nnx.scan(in_axes=(0, nnx.Carry, None, 0, 0), out_axes=(nnx.Carry, 0, 0, 0),
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def over_layers(block, x, inputs, cache, key):
      x, cache, aux_loss, stats = apply(block, x, inputs, cache, key)
      return x, cache, aux_loss, stats

    return over_layers(self.blocks, x, inputs, caches, keys)
