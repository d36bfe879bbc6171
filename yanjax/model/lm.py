"""The language model: embedding, L pre-norm residual layers, final norm, output head (yanjax/model/head.py).

Each layer is  x = x + Mixer(RMSNorm(x));  x = x + FFN(RMSNorm(x))  (paper section 2.1), where Mixer is the
layer's entry of `cfg.pattern` repeated (yanjax/model/mixers.py: MCSD, causal or sliding-window attention), and
FFN is the dense GeGLU MLP or the selective-activation FFN (router=True). One code path (`_run`) serves scoring
(`__call__`: logits), training (`hidden_states`: the final norm's output, which the loss takes with `output_head`,
in chunks of positions), prompt prefill (`prefill`) and decoding (`decode_step`): a decode step is a forward pass
of one token that starts from the cache.

Layers are unrolled (a list of L blocks) or, with `scan_layers`, scanned over the L / P repetitions of the
pattern of P mixers: the blocks at pattern position j are stacked over the repetitions, and layer i is
repetition i // P at position i % P, so compile time does not grow with depth.

Shapes: the legend in docs/model.md (P = len(pattern)).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from yanjax.model import head, layers
from yanjax.model.config import ModelConfig
from yanjax.model.mixers import MIXERS
from yanjax.model.partitioning import constrain
from yanjax.model.selective import SelectiveFFN, router_metrics

ACTIVATION_AXES = ("batch", "length", "embed")  # logical names of the residual stream [b, t, D]


class ModelCache(NamedTuple):
  """Decode state of the whole model."""
  layers: Any  # unrolled: a list of L per-layer caches; scanned: a list of P caches, each stacked over L / P
  position: jax.Array  # [b] int32: tokens consumed so far (the next token's position)


class LayerAux(NamedTuple):
  """What one layer reports beside its output: the same names from every layer, so they stack over layers."""
  loss: jax.Array  # [] weighted auxiliary loss, added to the training objective
  metrics: dict[str, jax.Array]  # name -> [] or a vector (the router's load: [E]), token-weighted means


class Block(nnx.Module):
  """One pre-norm residual layer with mixer `mixer` (a name in yanjax/model/mixers.py): [b, t, D] -> [b, t, D]."""

  def __init__(self, cfg: ModelConfig, mixer: str, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.mixer_norm = layers.RMSNorm((cfg.width,), ("embed",), cfg.norm_eps)
    self.mixer = MIXERS[mixer](cfg, rngs=rngs)
    self.ffn_norm = layers.RMSNorm((cfg.width,), ("embed",), cfg.norm_eps)
    if cfg.router:
      self.ffn = SelectiveFFN(cfg, rngs=rngs)
    else:
      self.ffn = layers.GatedMLP(cfg.width, cfg.mlp_width, cfg.init_std, rngs)

  def init_cache(self, batch: int):
    return self.mixer.init_cache(batch, jnp.dtype(self.cfg.dtype))

  def __call__(self, x, inputs: layers.BlockInputs, cache, key) -> tuple[jax.Array, Any, LayerAux]:
    """x [b, t, D] -> (x, cache, LayerAux)."""
    h, cache = self.mixer(self.mixer_norm(x), inputs, cache)
    x = x + h
    h = self.ffn_norm(x)
    if self.cfg.router:
      h, stats = self.ffn(h, step=inputs.step, key=key, mask=inputs.segment_ids != 0)
      aux = LayerAux(self.cfg.lb_loss_weight * stats.lb_loss + self.cfg.router_z_loss_weight * stats.z_loss,
                     router_metrics(stats))
    else:
      h, aux = self.ffn(h), LayerAux(jnp.zeros((), jnp.float32), {})
    return constrain(x + h, ACTIVATION_AXES), cache, aux


def _apply(block: Block, x, inputs, cache, key):
  return block(x, inputs, cache, key)


def _apply_in_turn(apply, blocks, x, inputs, caches, keys):
  """Runs `blocks` one after another: -> (x, their caches, their LayerAux stacked [n, ...]); `caches` and `keys`
  hold one entry per block, or are None."""
  outputs = []
  for i, block in enumerate(blocks):
    x, cache, aux = apply(block, x, inputs, None if caches is None else caches[i], None if keys is None else keys[i])
    outputs.append((cache, aux))
  return x, [cache for cache, _ in outputs], jax.tree.map(lambda *a: jnp.stack(a), *[a for _, a in outputs])


class LanguageModel(nnx.Module):
  """A Yan (MCSD), attention-baseline or hybrid language model: the layers' mixers are `cfg.pattern` repeated."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = layers.Embed(cfg.vocab_size, cfg.width, cfg.init_std, rngs)
    if cfg.scan_layers:
      def stacked(mixer):
        @nnx.split_rngs(splits=cfg.layers // len(cfg.pattern))
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
          return Block(cfg, mixer, rngs=rngs)
        return make_blocks(rngs)
      self.blocks = nnx.List([stacked(mixer) for mixer in cfg.pattern])  # P blocks, each stacked over L / P
    else:
      self.blocks = nnx.List([Block(cfg, mixer, rngs=rngs) for mixer in cfg.layer_mixers])
    self.final_norm = layers.RMSNorm((cfg.width,), ("embed",), cfg.norm_eps)
    if not cfg.tie_embeddings:
      self.head = layers.param(rngs, (cfg.width, cfg.vocab_size), ("embed", "vocab"),
                               layers.normal(cfg.init_std))

  # ---- public entry points -------------------------------------------------------------------------

  def __call__(self, tokens, segment_ids=None, positions=None, *, step=None, key=None):
    """Training / scoring pass over (possibly packed) sequences: `hidden_states`, then the head.

    Returns:
      (logits [b, t, V] float32, aux) with aux as `hidden_states` returns it.
    """
    x, aux = self.hidden_states(tokens, segment_ids, positions, step=step, key=key)
    return head.logits(x, self.output_head(x.dtype)), aux

  def hidden_states(self, tokens, segment_ids=None, positions=None, *, step=None, key=None):
    """The layers and the final norm without the head: what the loss takes (yanjax/model/head.py `head_loss`).

    Args:
      tokens: [b, t] int32.
      segment_ids: [b, t] int32 document ids (1, 2, ... per row; 0 = padding); None = one document per row.
      positions: [b, t] int32 position within the document; None = 0..t-1.
      step: training step for the router's exploration schedule (None: no exploration).
      key: PRNG key for router exploration.
    Returns:
      (x [b, t, D] in model.dtype, aux) with aux = {"aux_loss": the layers' auxiliary losses summed,
      "layer_metrics": {name: [L] or [L, E] (a vector metric: the router's load)}, each layer's metrics
      (`LayerAux`) stacked in layer order}.
    """
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x, aux, _ = self._run(tokens, segment_ids, positions, None, step, key)
    return x, aux

  def output_head(self, dtype) -> head.Head:
    """The output head's weight cast to `dtype` (the compute dtype): the head [D, V], or the tied embedding."""
    if self.cfg.tie_embeddings:
      return head.Head(layers.cast(self.embed.embedding[...], dtype), vocab_first=True)
    return head.Head(layers.cast(self.head[...], dtype), vocab_first=False)

  def init_cache(self, batch: int) -> ModelCache:
    if self.cfg.scan_layers:
      caches = [nnx.vmap(lambda blk: blk.init_cache(batch), in_axes=0, out_axes=0)(blocks) for blocks in self.blocks]
    else:
      caches = [blk.init_cache(batch) for blk in self.blocks]
    return ModelCache(caches, jnp.zeros((batch,), jnp.int32))
  def prefill(self, tokens, cache: ModelCache):
    """Continues one document per row from `cache`: tokens [b, t] -> (logits [b, t, V], new cache)."""
    positions = cache.position[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    segment_ids = jnp.ones(tokens.shape, jnp.int32)
    x, _, layer_caches = self._run(tokens, segment_ids, positions, cache.layers, None, None)
    return head.logits(x, self.output_head(x.dtype)), ModelCache(layer_caches, cache.position + tokens.shape[1])

  def decode_step(self, cache: ModelCache, tokens):
    """One token per row: tokens [b] -> (logits [b, V], new cache)."""
    logits, cache = self.prefill(tokens[:, None], cache)
    return logits[:, 0], cache

  # ---- internals -----------------------------------------------------------------------------------

  def _run(self, tokens, segment_ids, positions, caches, step, key):
    """-> (the final norm's output [b, t, D], aux as `hidden_states` returns it, the layers' caches)."""
    cfg = self.cfg
    x = constrain(self.embed(tokens, jnp.dtype(cfg.dtype)), ACTIVATION_AXES)
    reset = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
    inputs = layers.BlockInputs(reset, segment_ids, positions, step)
    keys = jax.random.split(key, cfg.layers) if key is not None else None
    apply = _apply if cfg.remat == "none" else nnx.remat(_apply, policy=layers.REMAT_POLICIES[cfg.remat])
    if cfg.scan_layers:
      x, caches, aux = self._scan(apply, x, inputs, caches, keys)
    else:
      x, caches, aux = _apply_in_turn(apply, self.blocks, x, inputs, caches, keys)  # LayerAux of [L, ...]
    x = self.final_norm(x)
    return x, {"aux_loss": jnp.sum(aux.loss), "layer_metrics": aux.metrics}, caches

  def _scan(self, apply, x, inputs, caches, keys):
    """Scans the L / P repetitions of the pattern: -> (x, P caches stacked over L / P, LayerAux of [L, ...])."""
    p = len(self.cfg.pattern)
    repeats = self.cfg.layers // p
    keys = None if keys is None else keys.reshape(repeats, p, *keys.shape[1:])  # layer i = [i // P, i % P]

    @nnx.scan(in_axes=(0, nnx.Carry, None, 0, 0), out_axes=(nnx.Carry, 0, 0),
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def over_repeats(blocks, x, inputs, caches, keys):
      return _apply_in_turn(apply, blocks, x, inputs, caches, keys)  # one repetition: the pattern's P blocks

    x, caches, aux = over_repeats(self.blocks, x, inputs, caches, keys)
    return x, caches, jax.tree.map(lambda a: a.reshape(self.cfg.layers, *a.shape[2:]), aux)  # [L / P, P] -> [L]
