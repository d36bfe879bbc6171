"""Selective activation: a small router network picks, per token, which groups of FFN neurons take part.

The GeGLU FFN of width `mlp_width` is split into E groups of `group_width` neurons. A router MLP
(d -> router_hidden -> E, GELU between, no biases, float32) scores the groups; each token runs its top-k
groups and sums them weighted by gates:

    y = sum_{e in topk} g_e * GeGLU_e(x),    g_e = p_e / sum_{e' in topk} p_e'   (k > 1; k = 1: g_e = p_e)

Selection starts random and becomes learned (Yan's public statements; see docs/selective_activation.md):

    scores = (1 - lam) * p + lam * U,    U ~ uniform(0, 1) per token and group,
    lam = max(0, 1 - step / explore_steps)   (0 at inference, step=None, or explore_steps = 0).

Gates always come from p, so the router learns while the choice is still random.

Dispatch ("capacity" | "dropless"):
  capacity  Switch/MaxText token dropping, per batch row: each group takes at most
            C = min(t, ceil(capacity_factor * t * k / E)) token-slots of the row; first choices of every token
            are queued before any second choice, in time order within a choice. Group weights run as a batched
            matmul over [b, E, C, d].
  dropless  token-slots sorted by group, `jax.lax.ragged_dot` for both matmuls, unsorted; nothing dropped.

Shape legend: b = batch, t = time, d = width D, e/E = groups, k = top_k, f = group width, c = capacity.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from yanjax.config import ModelConfig
from yanjax.model.layers import cast, geglu, normal, param

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
  gates: jax.Array  # [b, t, k] float32 weights of the chosen groups
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
  # (n - step) / n rather than 1 - step / n: exactly 0 at step = n even when XLA turns / n into * (1 / n).
  return jnp.maximum(0.0, (explore_steps - jnp.asarray(step, jnp.float32)) / explore_steps)


def group_capacity(tokens: int, groups: int, top_k: int, capacity_factor: float) -> int:
  """C = min(tokens, ceil(capacity_factor * tokens * k / E)): token-slots one group takes from a row."""
  return max(1, min(tokens, math.ceil(capacity_factor * tokens * top_k / groups)))


def capacity_positions(groups: jax.Array, valid: jax.Array, num_groups: int) -> jax.Array:
  """Queue position of each token-slot in its group, counting only real tokens.

  Priority: all first choices of a row (in time order), then all second choices, and so on.

  Args:
    groups: [b, t, k] int chosen groups.
    valid: [b, t] bool real tokens.
    num_groups: E.
  Returns:
    [b, t, k] int32 position (0-based); meaningless where not valid.
  """
  b, t, k = groups.shape
  onehot = jax.nn.one_hot(groups, num_groups, dtype=jnp.int32) * valid[:, :, None, None]  # b t k e
  queue = onehot.transpose(0, 2, 1, 3).reshape(b, k * t, num_groups)  # k-major order
  pos = jnp.sum((jnp.cumsum(queue, axis=1) - 1) * queue, axis=-1)  # b (k t)
  return pos.reshape(b, k, t).transpose(0, 2, 1)


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


class SelectiveFFN(nnx.Module):
  """GeGLU FFN in E neuron groups, top-k of them per token chosen by a router MLP: [b, t, d] -> [b, t, d]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if not cfg.router:
      raise ValueError("SelectiveFFN needs model.router=True (group_width is mlp_width / groups only then)")
    d, e, f, h = cfg.width, cfg.groups, cfg.group_width, cfg.router_hidden
    self.router_in = param(rngs, (d, h), ("embed", None), normal(cfg.init_std))
    self.router_out = param(rngs, (h, e), (None, "experts"), normal(cfg.init_std))
    self.gate_up = param(rngs, (e, d, 2, f), ("experts", "embed", None, "mlp"), normal(cfg.init_std))
    self.down = param(rngs, (e, f, d), ("experts", "mlp", "embed"), normal(cfg.init_std / 2))
    self.groups = e
    self.top_k = cfg.top_k
    self.dispatch = cfg.dispatch
    self.capacity_factor = cfg.capacity_factor
    self.explore_steps = cfg.explore_steps

  def route(self, x: jax.Array, *, step=None, key=None) -> Routing:
    """x [b, t, d] -> the router's choice of k groups per token (float32 throughout)."""
    x32 = x.astype(jnp.float32)
    hidden = jax.nn.gelu(jnp.einsum("btd,dh->bth", x32, self.router_in[...], precision=_HIGHEST))
    logits = jnp.einsum("bth,he->bte", hidden, self.router_out[...], precision=_HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)
    lam = exploration_weight(step, self.explore_steps)
    scores = probs
    if step is not None and self.explore_steps > 0:
      if key is None:
        raise ValueError("SelectiveFFN: `key` is required when `step` is given and explore_steps > 0")
      noise = jax.random.uniform(key, probs.shape, jnp.float32)
      scores = (1.0 - lam) * probs + lam * noise
    _, groups = jax.lax.top_k(jax.lax.stop_gradient(scores), self.top_k)
    chosen = jnp.take_along_axis(probs, groups, axis=-1)
    # Renormalised over the k chosen groups; with k = 1 that would be identically 1 and give the router no
    # gradient through the output, so k = 1 keeps the raw probability (as Switch does).
    gates = chosen / jnp.sum(chosen, axis=-1, keepdims=True) if self.top_k > 1 else chosen
    return Routing(logits, probs, groups.astype(jnp.int32), gates, lam)

  def __call__(self, x, *, step=None, key=None, mask=None) -> tuple[jax.Array, RouterStats]:
    """Runs each token through its chosen groups.

    Args:
      x: [b, t, d] in compute dtype.
      step: scalar int (None = inference, no exploration).
      key: PRNG key for exploration (required when step is given and explore_steps > 0).
      mask: [b, t] bool of real tokens (None = all real; padding tokens are excluded from stats, losses and
        capacity).
    Returns:
      (y [b, t, d] in x.dtype, RouterStats); padding tokens get y = 0.
    """
    b, t, _ = x.shape
    valid = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
    routing = self.route(x, step=step, key=key)
    if self.dispatch == "capacity":
      y, kept = self._capacity(x, routing, valid)
    elif self.dispatch == "dropless":
      y, kept = self._dropless(x, routing, valid)
    else:
      raise ValueError(f"unknown dispatch {self.dispatch!r}")
    return y, router_stats(routing, valid, kept)

  def _capacity(self, x, routing: Routing, valid):
    """Token dropping per row with one-hot dispatch/combine tensors [b, t, E, C]."""
    b, t, _ = x.shape
    cap = group_capacity(t, self.groups, self.top_k, self.capacity_factor)
    pos = capacity_positions(routing.groups, valid, self.groups)
    kept = valid[..., None] & (pos < cap)  # b t k
    to_group = jax.nn.one_hot(routing.groups, self.groups, dtype=jnp.float32) * kept[..., None]  # b t k e
    to_slot = jax.nn.one_hot(pos, cap, dtype=jnp.float32)  # b t k c (all-zero where pos >= cap)
    dispatch = jnp.einsum("btke,btkc->btec", to_group, to_slot)
    combine = jnp.einsum("btke,btkc,btk->btec", to_group, to_slot, routing.gates)
    xe = jnp.einsum("btec,btd->becd", cast(dispatch, x.dtype), x)  # b e c d
    ye = jax.vmap(geglu, in_axes=(1, 0, 0), out_axes=1)(xe, self.gate_up[...], self.down[...])
    y = jnp.einsum("btec,becd->btd", cast(combine, x.dtype), ye, preferred_element_type=jnp.float32)
    return y.astype(x.dtype), kept

  def _dropless(self, x, routing: Routing, valid):
    """Sorts token-slots by group, runs both matmuls with ragged_dot, unsorts; padding slots sort last."""
    b, t, d = x.shape
    k, e = self.top_k, self.groups
    f = self.down.shape[1]
    slot_valid = jnp.repeat(valid.reshape(b * t), k)  # (b t k)
    slot_group = jnp.where(slot_valid, routing.groups.reshape(b * t * k), e)  # padding -> E, sorted last
    order = jnp.argsort(slot_group, stable=True)
    sizes = jnp.sum(jax.nn.one_hot(slot_group, e, dtype=jnp.int32), axis=0)  # [E], excludes padding
    xs = jnp.take(x.reshape(b * t, d), order // k, axis=0)  # (b t k) d, sorted
    gate_up = cast(self.gate_up[...], x.dtype).reshape(e, d, 2 * f)
    h = jax.lax.ragged_dot(xs, gate_up, sizes).reshape(-1, 2, f)  # rows past sum(sizes) are zero
    ys = jax.lax.ragged_dot(jax.nn.gelu(h[:, 0]) * h[:, 1], cast(self.down[...], x.dtype), sizes)
    ys = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True).reshape(b * t, k, d)
    gates = cast(routing.gates * valid[..., None], x.dtype).reshape(b * t, k)
    y = jnp.einsum("nkd,nk->nd", ys, gates, preferred_element_type=jnp.float32)
    return y.reshape(b, t, d).astype(x.dtype), jnp.broadcast_to(valid[..., None], (b, t, k))
