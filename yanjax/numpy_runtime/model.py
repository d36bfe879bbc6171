"""The Yan (MCSD) and attention-baseline language models in NumPy: the reference for other runtimes.

Every step is float32 and written out in the order docs/export.md lists it; names in `self.w[...]` are the
export's array names. One code path serves a whole sequence and a decode step: a call consumes t tokens per
row from a `State` and returns the logits and the state after them. Layer i's mixer is the NumPy twin that
mixers.py registers for its entry of the config's `pattern`, pattern[i % len(pattern)] (mcsd.py, attention.py, ...).

Shapes: the legend in docs/model.md.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .format import Export, check_config
from .layers import F32, BlockInputs, geglu, gelu, rms_norm, softmax
from .mixers import TWINS, layer_mixers


class State(NamedTuple):
  layers: list  # one state per layer, its mixer's (MCSDState, KVState, ...)
  position: int  # tokens consumed so far by every row


class Model:
  """A loaded export, runnable with NumPy."""

  def __init__(self, export: Export):
    self.cfg = check_config(export.config)
    self.w = export.arrays
    self.export = export
    self.mixers = [TWINS[mixer](self.cfg, {name: self.w[f"blocks.{i}.mixer.{name}"]
                                           for name in TWINS[mixer].shapes(self.cfg)})
                   for i, mixer in enumerate(layer_mixers(self.cfg["pattern"], self.cfg["layers"]))]

  # ---- public entry points ---------------------------------------------------------------------------

  def init_state(self, batch: int, max_len: int | None = None) -> State:
    """Empty decode state; attention keeps `max_len` KV slots (default: the config's max_decode_len)."""
    return State([mixer.init_state(batch, max_len) for mixer in self.mixers], 0)

  def forward(self, tokens, segment_ids=None, positions=None) -> np.ndarray:
    """Scores whole sequences, possibly packed: tokens [b, t] -> logits [b, t, V] float32.

    segment_ids [b, t]: document ids (0 = padding), a new document starts wherever the id changes;
    positions [b, t]: position in the document (RoPE). Defaults: one document per row, positions 0..t-1.
    """
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    segment_ids = np.ones((b, t), np.int64) if segment_ids is None else np.asarray(segment_ids)
    positions = np.broadcast_to(np.arange(t), (b, t)) if positions is None else np.asarray(positions)
    logits, _ = self._run(tokens, segment_ids, positions, None)
    return logits

  def prefill(self, tokens, state: State) -> tuple[np.ndarray, State]:
    """Continues one document per row from `state`: tokens [b, t] -> (logits [b, t, V], state)."""
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    positions = np.broadcast_to(state.position + np.arange(t), (b, t))
    logits, layers = self._run(tokens, np.ones((b, t), np.int64), positions, state.layers)
    return logits, State(layers, state.position + t)

  def decode_step(self, state: State, tokens) -> tuple[np.ndarray, State]:
    """One token per row: tokens [b] -> (logits [b, V], state)."""
    logits, state = self.prefill(np.asarray(tokens)[:, None], state)
    return logits[:, 0], state

  # ---- the layers, in order ----------------------------------------------------------------------------

  def _run(self, tokens, segment_ids, positions, states):
    c, w = self.cfg, self.w
    x = w["embed.embedding"][tokens]  # [b, t, D]
    reset = np.zeros(tokens.shape, bool)
    reset[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]  # a new document starts here
    inputs = BlockInputs(reset, segment_ids, positions)
    new_states = []
    for i, mixer in enumerate(self.mixers):
      p = f"blocks.{i}."
      h = rms_norm(x, w[p + "mixer_norm.scale"], c["norm_eps"])
      h, state = mixer(h, inputs, None if states is None else states[i])
      new_states.append(state)
      x = x + h
      h = rms_norm(x, w[p + "ffn_norm.scale"], c["norm_eps"])
      if c["router"]:
        h = self._selective_ffn(p + "ffn.", h) * (segment_ids != 0)[..., None]
      else:
        h = geglu(h, w[p + "ffn.gate_up"], w[p + "ffn.down"])
      x = (x + h).astype(F32)
    x = rms_norm(x, w["final_norm.scale"], c["norm_eps"])
    head = w["embed.embedding"].T if c["tie_embeddings"] else w["head"]
    return (x @ head).astype(F32), new_states

  def _selective_ffn(self, p, x):
    """Selective-activation FFN at inference: every token runs its top-k groups (no dropping, no
    exploration), weighted by the router's probabilities renormalised over the chosen k (k = 1: raw)."""
    c, w = self.cfg, self.w
    logits = gelu(x @ w[p + "router_in"]) @ w[p + "router_out"]  # [b, t, E]
    probs = softmax(logits)  # [b, t, E]
    chosen = np.argsort(-probs, axis=-1, kind="stable")[..., :c["top_k"]]  # [b, t, k], lower id on ties
    picked = np.take_along_axis(probs, chosen, axis=-1)
    gates = picked / np.sum(picked, axis=-1, keepdims=True) if c["top_k"] > 1 else picked
    gate_up, down = w[p + "gate_up"], w[p + "down"]  # [E, D, 2, g], [E, g, D]
    y = np.zeros_like(x)
    for group in np.unique(chosen):  # ascending; the groups no token chose contribute nothing
      weight = np.sum(np.where(chosen == group, gates, F32(0)), axis=-1)  # [b, t]: this group's gate, or 0
      rows = weight > 0
      if np.any(rows):
        y[rows] += weight[rows][:, None] * geglu(x[rows], gate_up[group], down[group])
    return y.astype(F32)


def config_summary(config: dict[str, Any]) -> str:
  c = check_config(config)
  mixers = " + ".join(TWINS[name].summary(c) for name in c["pattern"])
  ffn = f"selective E={c['groups']} k={c['top_k']}" if c["router"] else f"GeGLU F={c['mlp_width']}"
  repeats = f"{c['layers'] // len(c['pattern'])} x ({mixers})" if len(c["pattern"]) > 1 else mixers
  return f"{c['layers']} layers, D={c['width']}, V={c['vocab_size']}, {repeats}, {ffn}"
