"""The Yan (MCSD) and attention-baseline language models in NumPy: the reference for other runtimes.

Every step is float32 and written out in the order docs/export.md lists it; names in `self.w[...]` are the
export's array names. One code path serves a whole sequence and a decode step: a call consumes t tokens per
row from a `State` and returns the logits and the state after them. MCSD runs its recurrence token by token
(the O(1) decode form), so the forward pass is the decode loop run over the prompt.

Shape legend: b = batch, t = time, D = width, V = vocabulary, C = channels, Dc = D / C, H = heads,
E = head dim, F = FFN width, G = FFN groups, k = top_k, S = KV-cache slots.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .format import Export, check_config

F32 = np.float32


# ---- elementwise functions (the JAX model's definitions) --------------------------------------------

def sigmoid(x):
  return (0.5 * (np.tanh(0.5 * x) + 1.0)).astype(F32)


def silu(x):
  return (x * sigmoid(x)).astype(F32)


def gelu(x):
  """tanh-approximated GELU (jax.nn.gelu's default): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
  return (0.5 * x * (1.0 + np.tanh(F32(np.sqrt(2.0 / np.pi)) * (x + F32(0.044715) * x ** 3)))).astype(F32)


def softmax(x, axis=-1):
  e = np.exp(x - np.max(x, axis=axis, keepdims=True))
  return (e / np.sum(e, axis=axis, keepdims=True)).astype(F32)


def rms_norm(x, scale, eps):
  """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * scale."""
  return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + F32(eps)) * scale).astype(F32)


def geglu(x, gate_up, down):
  """x [..., D], gate_up [D, 2, F], down [F, D]: (gelu(x W_gate) * (x W_up)) W_down."""
  h = np.einsum("...d,dkf->...kf", x, gate_up)
  return np.einsum("...f,fd->...d", gelu(h[..., 0, :]) * h[..., 1, :], down).astype(F32)


def paper_log_rates(channels: int) -> np.ndarray:
  """[2, C] fixed log rates, computed in float64 then rounded to float32: row 0 slope log g_i = -beta_i,
  beta_i = 2^(-8 (i+1) / C); row 1 decay log alpha_i, alpha_i = 1 - 2^(-5-i)."""
  i = np.arange(channels, dtype=np.float64)
  return np.stack([-(2.0 ** (-8.0 * (i + 1) / channels)), np.log(1.0 - 2.0 ** (-5.0 - i))]).astype(F32)


def rope(x, positions, theta):
  """Rotary embedding, rotate-half convention: x [b, t, H, E], positions [b, t]."""
  half = x.shape[-1] // 2
  freq = (F32(theta) ** (-np.arange(half, dtype=F32) / F32(half))).astype(F32)
  angle = positions[..., None, None].astype(F32) * freq  # [b, t, 1, E/2]
  x1, x2 = x[..., :half], x[..., half:]
  cos, sin = np.cos(angle), np.sin(angle)
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(F32)


# ---- decode state -----------------------------------------------------------------------------------

class MCSDState(NamedTuple):
  h: np.ndarray  # [b, 2C, Dc] float32: recurrence states of [V ; E] (V channels first)
  count: np.ndarray  # [b] int: tokens seen since the document started


class KVState(NamedTuple):
  """KV cache of one attention layer. Its arrays are written in place: a state passed to prefill or
  decode_step is used up (copy k and v first to branch a generation)."""
  k: np.ndarray  # [b, S, H, E] float32 (keys after RoPE)
  v: np.ndarray  # [b, S, H, E] float32
  length: int  # slots filled (the same for every row)


class State(NamedTuple):
  layers: list  # one MCSDState or KVState per layer
  position: int  # tokens consumed so far by every row


class Model:
  """A loaded export, runnable with NumPy."""

  def __init__(self, export: Export):
    self.cfg = check_config(export.config)
    self.w = export.arrays
    self.export = export

  # ---- public entry points ---------------------------------------------------------------------------

  def init_state(self, batch: int, max_len: int | None = None) -> State:
    """Empty decode state; attention keeps `max_len` KV slots (default: the config's max_decode_len)."""
    c = self.cfg
    layers = []
    for _ in range(c["layers"]):
      if c["arch"] == "yan":
        dc = c["width"] // c["channels"]
        layers.append(MCSDState(np.zeros((batch, 2 * c["channels"], dc), F32), np.zeros((batch,), np.int64)))
      else:
        shape = (batch, max_len or c["max_decode_len"], c["heads"], c["width"] // c["heads"])
        layers.append(KVState(np.zeros(shape, F32), np.zeros(shape, F32), 0))
    return State(layers, 0)

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
    new_states = []
    for i in range(c["layers"]):
      p = f"blocks.{i}."
      h = rms_norm(x, w[p + "mixer_norm.scale"], c["norm_eps"])
      state = None if states is None else states[i]
      if c["arch"] == "yan":
        h, state = self._mcsd(p + "mixer.", h, reset, state)
      else:
        h, state = self._attention(p + "mixer.", h, segment_ids, positions, state)
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
    return np.einsum("btd,dv->btv", x, head).astype(F32), new_states

  def _mcsd(self, p, x, reset, state):
    """MCSD mixer: x [b, t, D] -> y [b, t, D], running the recurrence one token at a time."""
    c, w = self.cfg, self.w
    b, t, _ = x.shape
    ch = c["channels"]
    dc = c["width"] // ch
    if state is None:
      state = MCSDState(np.zeros((b, 2 * ch, dc), F32), np.zeros((b,), np.int64))
    # 1. Per-channel projections: proj [C, Dc, 4, Dc] gives U, V, E, F, each [b, t, C, Dc].
    u, v, e, f = np.moveaxis(np.einsum("btcd,cdke->btkce", x.reshape(b, t, ch, dc), w[p + "proj"]), 2, 0)
    # 2. Rates: log g (slope) and log alpha (decay), [2, C].
    if c["learnable_rates"]:
      log_rates = (-np.exp(w[p + "rate_logits"])).astype(F32)
    else:
      log_rates = paper_log_rates(ch)
    a = np.exp(log_rates.reshape(2 * ch))[None, :, None]  # [1, 2C, 1]
    log_g = log_rates[0]
    # 3. The recurrence h_n = a h_{n-1} + [V_n ; E_n], cut at document starts, and the history each token
    #    reads: h_n (include_current) or a h_{n-1} (strict past; zero at a document start).
    h, count = state.h, state.count.copy()
    history = np.empty((b, t, 2 * ch, dc), F32)
    counts = np.empty((b, t), np.int64)
    for n in range(t):
      r = reset[:, n][:, None, None]
      count = np.where(reset[:, n], 0, count)
      previous = np.where(r, F32(0), h)
      h = (a * previous + np.concatenate([v[:, n], e[:, n]], axis=1)).astype(F32)
      history[:, n] = h if c["include_current"] else a * previous
      counts[:, n] = count
      count = count + 1
    # 4. Slope: normalised history of V; the normaliser is sum_{j=1..k} g^j (strict past) or
    #    sum_{j=0..k} g^j (include_current) for the k-th token of its document (k counts from 0).
    k = counts[..., None].astype(F32)  # [b, t, 1]
    geometric = np.expm1(k * log_g) / np.expm1(log_g)  # sum_{j=0}^{k-1} g^j, [b, t, C]
    z = (np.exp(log_g) * geometric if not c["include_current"] else geometric + np.exp(k * log_g))[..., None]
    v_hist = np.where(z > 0, history[:, :, :ch] / np.where(z > 0, z, F32(1)), v)  # first token: V itself
    theta_s = silu(v_hist.astype(F32)) * u
    # 5. Decay: RMSNorm over each channel's Dc features of the E history, gated by sigmoid(F).
    theta_d = rms_norm(history[:, :, ch:], w[p + "decay_norm.scale"], c["norm_eps"]) * sigmoid(f)
    # 6. Combine: concat + output projection out [2, C, Dc, D], or the sum.
    if c["combine"] == "concat":
      y = np.einsum("kbtcd,kcde->bte", np.stack([theta_s, theta_d]), w[p + "out"])
    else:
      y = (theta_s + theta_d).reshape(b, t, c["width"])
    return y.astype(F32), MCSDState(h, count)

  def _attention(self, p, x, segment_ids, positions, state):
    """Causal self-attention with RoPE; with a state the new keys are appended to its KV cache."""
    c, w = self.cfg, self.w
    b, t, _ = x.shape
    q, k, v = np.moveaxis(np.einsum("btd,dkhe->btkhe", x, w[p + "qkv"]), 2, 0)  # each [b, t, H, E]
    q, k = rope(q, positions, c["rope_theta"]), rope(k, positions, c["rope_theta"])
    if state is None:  # a whole (packed) sequence: causal and same-document
      mask = np.tril(np.ones((t, t), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    else:
      start, end = state.length, state.length + t
      if end > state.k.shape[1]:
        raise ValueError(f"the KV cache holds {state.k.shape[1]} tokens; {end} were asked for (raise max_len "
                         f"in init_state)")
      state.k[:, start:end], state.v[:, start:end] = k, v
      state = KVState(state.k, state.v, end)
      k, v = state.k[:, :end], state.v[:, :end]
      mask = (np.arange(end)[None, :] <= (start + np.arange(t))[:, None])[None]  # [1, t, s]
    scores = np.einsum("bthe,bshe->bhts", q, k) / F32(np.sqrt(q.shape[-1]))
    scores = np.where(mask[:, None], scores, F32(-np.inf))
    attended = np.einsum("bhts,bshe->bthe", softmax(scores, axis=-1), v)
    return np.einsum("bthe,hed->btd", attended, w[p + "out"]).astype(F32), state

  def _selective_ffn(self, p, x):
    """Selective-activation FFN at inference: every token runs its top-k groups (no dropping, no
    exploration), weighted by the router's probabilities renormalised over the chosen k (k = 1: raw)."""
    c, w = self.cfg, self.w
    logits = np.einsum("bth,he->bte", gelu(np.einsum("btd,dh->bth", x, w[p + "router_in"])),
                       w[p + "router_out"])
    probs = softmax(logits)  # [b, t, G]
    chosen = np.argsort(-probs, axis=-1, kind="stable")[..., :c["top_k"]]  # [b, t, k], lower id on ties
    picked = np.take_along_axis(probs, chosen, axis=-1)
    gates = picked / np.sum(picked, axis=-1, keepdims=True) if c["top_k"] > 1 else picked
    gate_up, down = w[p + "gate_up"], w[p + "down"]  # [G, D, 2, f], [G, f, D]
    y = np.zeros_like(x)
    for g in range(c["groups"]):
      weight = np.sum(np.where(chosen == g, gates, F32(0)), axis=-1)  # [b, t]: gate of group g, or 0
      rows = weight > 0
      if np.any(rows):
        y[rows] += weight[rows][:, None] * geglu(x[rows], gate_up[g], down[g])
    return y.astype(F32)


def config_summary(config: dict[str, Any]) -> str:
  c = check_config(config)
  mixer = (f"MCSD C={c['channels']} combine={c['combine']} include_current={c['include_current']} "
           f"learnable_rates={c['learnable_rates']}" if c["arch"] == "yan" else f"attention H={c['heads']}")
  ffn = f"selective G={c['groups']} k={c['top_k']}" if c["router"] else f"GeGLU F={c['mlp_width']}"
  return f"{c['layers']} layers, D={c['width']}, V={c['vocab_size']}, {mixer}, {ffn}"
