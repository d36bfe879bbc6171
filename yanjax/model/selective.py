"""Selective activation: a small router network picks, per token, which groups of FFN neurons take part.

The GeGLU FFN of width F = `mlp_width` is split into E groups of g = `group_width` neurons. A router MLP
(D -> R -> E, R = `router_hidden`, GELU between, no biases, float32) scores the groups; each token runs its
top-k groups and sums them weighted by gates w_e:

    y = sum_{e in topk} w_e * GeGLU_e(x),    w_e = p_e / sum_{e' in topk} p_e'   (k > 1; k = 1: w_e = p_e)

Selection starts random and becomes learned (Yan's public statements; see docs/selective_activation.md):

    scores = (1 - lam) * p + lam * U,    U ~ uniform(0, 1) per token and group,
    lam = max(0, 1 - step / explore_steps)   (0 at inference, step=None, or explore_steps = 0).

Gates always come from p, so the router learns while the choice is still random.

Dispatch ("capacity" | "dropless", `yanjax.model.dispatch`): capacity drops token-slots past each group's
per-row capacity c = min(t, ceil(capacity_factor * t * k / E)); dropless runs them all, by the grouped matmul
`model.grouped_matmul` names. Both are linear in t and keep tokens on their shard under a mesh.

Shapes: the legend in docs/model.md; e indexes groups.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from yanjax.model.config import ModelConfig
from yanjax.model.dispatch import capacity_dispatch, dropless_dispatch, group_capacity
from yanjax.model.layers import normal, param
from yanjax.model.partitioning import length_ways, map_tokens

_HIGHEST = jax.lax.Precision.HIGHEST


class RouterStats(NamedTuple):
  """Router statistics of one call, over real (unmasked) tokens; losses are unweighted."""
  lb_loss: jax.Array  # [] Switch load-balancing loss E * sum_e load_e * P_e (1 when uniform)
  z_loss: jax.Array  # [] mean logsumexp(logits)^2
  load: jax.Array  # [E] fraction of token-slots (top-k assignments, before dropping) per group; sums to 1
  dropped_fraction: jax.Array  # [] fraction of token-slots dropped by capacity (0 in dropless)
  entropy: jax.Array  # [] mean router entropy, nats
  explore: jax.Array  # [] exploration weight lam used for the selection


class Routing(NamedTuple):
  """The router's decision for [b, t] tokens."""
  logits: jax.Array  # [b, t, E] float32
  probs: jax.Array  # [b, t, E] float32 softmax(logits)
  groups: jax.Array  # [b, t, k] int32 chosen groups, distinct per token
  gates: jax.Array  # [b, t, k] float32 weights w_e of the chosen groups
  explore: jax.Array  # [] float32 lam


def exploration_weight(step, explore_steps: int) -> jax.Array:
  """lam = max(0, 1 - step / explore_steps): 1 at step 0, 0 from explore_steps on; 0 if step is None.

  Args:
    step: scalar int (Python or traced) training step, or None for inference.
    explore_steps: Python int >= 0; 0 disables exploration.
  Returns:
    [] float32.
  """
  if step is None or explore_steps <= 0:
    return jnp.zeros((), jnp.float32)
  # (n - step) / n, n = explore_steps, not 1 - step / n: exactly 0 at step = n even if XLA turns / n into * (1 / n).
  return jnp.maximum(0.0, (explore_steps - jnp.asarray(step, jnp.float32)) / explore_steps)


def router_stats(routing: Routing, valid: jax.Array, kept: jax.Array) -> RouterStats:
  """Losses and statistics over real tokens.

  Args:
    routing: the router's decision.
    valid: [b, t] bool real tokens.
    kept: [b, t, k] bool token-slots that ran (valid and within capacity).
  """
  num_groups = routing.probs.shape[-1]
  k = routing.groups.shape[-1]
  v = valid.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(v), 1.0)
  slots = jnp.sum(jax.nn.one_hot(routing.groups, num_groups, dtype=jnp.float32), axis=-2) * v[..., None]
  load = jnp.sum(slots, axis=(0, 1)) / (n * k)
  mean_prob = jnp.sum(routing.probs * v[..., None], axis=(0, 1)) / n
  lse = jax.nn.logsumexp(routing.logits, axis=-1)
  entropy = -jnp.sum(routing.probs * jax.nn.log_softmax(routing.logits, axis=-1), axis=-1)
  dropped = (jnp.sum(v) * k - jnp.sum(kept.astype(jnp.float32))) / (n * k)
  return RouterStats(
      lb_loss=num_groups * jnp.sum(load * mean_prob),
      z_loss=jnp.sum(lse * lse * v) / n,
      load=load,
      dropped_fraction=dropped,
      entropy=jnp.sum(entropy * v) / n,
      explore=routing.explore)


def router_metrics(stats: RouterStats) -> dict[str, jax.Array]:
  """A layer's metrics from its router's statistics (`LayerAux.metrics` in yanjax/model/lm.py): per-group load
  [E] and scalars; the trainer logs the scalars' layer mean, validation each layer's values."""
  return {"router_load_group": stats.load, "router_max_load": jnp.max(stats.load),
          "router_dropped": stats.dropped_fraction, "router_entropy": stats.entropy, "router_explore": stats.explore}


class SelectiveFFN(nnx.Module):
  """GeGLU FFN in E neuron groups, top-k of them per token chosen by a router MLP: [b, t, D] -> [b, t, D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if not cfg.router:
      raise ValueError("SelectiveFFN needs model.router=True (group_width is mlp_width / groups only then)")
    d, e, g, r = cfg.width, cfg.groups, cfg.group_width, cfg.router_hidden
    # "experts" is the group dimension's logical axis name, as MoE frameworks name it (the sharding rules map it
    # to the mesh axis `expert`; docs/selective_activation.md, "Names").
    self.router_in = param(rngs, (d, r), ("embed", None), normal(cfg.init_std))
    self.router_out = param(rngs, (r, e), (None, "experts"), normal(cfg.init_std))
    self.gate_up = param(rngs, (e, d, 2, g), ("experts", "embed", None, "mlp"), normal(cfg.init_std))
    self.down = param(rngs, (e, g, d), ("experts", "mlp", "embed"), normal(cfg.init_std / 2))
    self.groups = e
    self.top_k = cfg.top_k
    self.dispatch = cfg.dispatch
    self.grouped_matmul = cfg.grouped_matmul
    self.capacity_factor = cfg.capacity_factor
    self.explore_steps = cfg.explore_steps

  def route(self, x: jax.Array, *, step=None, key=None) -> Routing:
    """x [b, t, D] -> the router's choice of k groups per token (float32 throughout)."""
    x32 = x.astype(jnp.float32)
    hidden = jax.nn.gelu(jnp.einsum("btd,dr->btr", x32, self.router_in[...], precision=_HIGHEST))
    logits = jnp.einsum("btr,re->bte", hidden, self.router_out[...], precision=_HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)
    lam = exploration_weight(step, self.explore_steps)
    scores = probs
    if step is not None and self.explore_steps > 0:
      if key is None:
        raise ValueError("SelectiveFFN: `key` is required when `step` is given and explore_steps > 0")
      noise = jax.random.uniform(key, probs.shape, jnp.float32)
      scores = (1.0 - lam) * probs + lam * noise
    groups = map_tokens(lambda s: jax.lax.top_k(s, self.top_k)[1], jax.lax.stop_gradient(scores))
    chosen = jnp.take_along_axis(probs, groups, axis=-1)
    # Renormalised over the k chosen groups; with k = 1 that would be identically 1 and give the router no
    # gradient through the output, so k = 1 keeps the raw probability (as Switch does).
    gates = chosen / jnp.sum(chosen, axis=-1, keepdims=True) if self.top_k > 1 else chosen
    return Routing(logits, probs, groups.astype(jnp.int32), gates, lam)

  def __call__(self, x, *, step=None, key=None, mask=None) -> tuple[jax.Array, RouterStats]:
    """Runs each token through its chosen groups.

    Args:
      x: [b, t, D] in compute dtype.
      step: scalar int (None = inference, no exploration).
      key: PRNG key for exploration (required when step is given and explore_steps > 0).
      mask: [b, t] bool of real tokens (None = all real; padding tokens are excluded from stats, losses and
        capacity).
    Returns:
      (y [b, t, D] in x.dtype, RouterStats); padding tokens get y = 0.
    """
    b, t, _ = x.shape
    valid = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
    routing = self.route(x, step=step, key=key)
    weights = (routing.groups, routing.gates, valid, self.gate_up[...], self.down[...])
    if self.dispatch == "capacity":
      # per device's segment of each row when the sequence is split (yanjax/model/dispatch.py)
      capacity = group_capacity(t // length_ways(t), self.groups, self.top_k, self.capacity_factor)
      y, kept = capacity_dispatch(x, *weights, capacity)
    elif self.dispatch == "dropless":
      y, kept = dropless_dispatch(x, *weights, self.grouped_matmul)
    else:
      raise ValueError(f"unknown dispatch {self.dispatch!r}")
    return y, router_stats(routing, valid, kept)
