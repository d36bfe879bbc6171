"""An export as one ONNX graph for ONNX Runtime: t tokens per row in, their logits and the state after them out.

The graph is the NumPy runtime's `Model.prefill` (yanjax/numpy_runtime/model.py) written with the `onnx`
package's graph builder: call it with the prompt to prefill (t = its length) and with t = 1 for each decode
step, passing the state it returned. Every layer's state is an explicit input and output; docs/export.md
("ONNX") lists the names, shapes and order. Nothing here imports JAX: the graph is built from an export's
manifest and the arrays of its weights file as stored.

    from yanjax.export.onnx_graph import build_graph, save_graph, stored_weights
    save_graph(build_graph(manifest, stored_weights(directory, manifest)), directory)   # model.onnx(.data)

Weights are the export's arrays: float32 (a bfloat16 export's values upcast), or an int8 export's int8
matrices with their scales, dequantized in the graph as float32(q) * scale (ONNX Runtime folds that at load).

Shapes: the legend in docs/model.md; s: cached keys (the tokens consumed before, `position`), W: window.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from yanjax.numpy_runtime import format as fmt
from yanjax.numpy_runtime.layers import F32
from yanjax.numpy_runtime.mcsd import MCSD
from yanjax.numpy_runtime.mcsd_dd import GATE_BIAS
from yanjax.numpy_runtime.mixers import layer_mixers
from yanjax.numpy_runtime.quantize import SCALE_SUFFIX

OPSET = 18
TOKENS, POSITION, LOGITS = "tokens", "position", "logits"


class Graph:
  """The nodes, initializers and names of a graph under construction; every method returns an output's name."""

  def __init__(self, prefix: str = ""):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self.prefix = prefix
    self.count = 0

  def fresh(self, hint: str) -> str:
    self.count += 1
    return f"{self.prefix}{hint}_{self.count}"

  def const(self, value, name: str | None = None) -> str:
    """An initializer holding `value` (a NumPy array, its dtype kept)."""
    name = name or self.fresh("const")
    self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
    return name

  def i64(self, *values: int) -> str:
    return self.const(np.array(values, np.int64))

  def f32(self, value) -> str:
    return self.const(np.asarray(value, F32))

  def op(self, op_type: str, *inputs: str, **attrs) -> str:
    return self.ops(op_type, inputs, 1, **attrs)[0]

  def ops(self, op_type: str, inputs, outputs: int, **attrs) -> list[str]:
    names = [self.fresh(op_type.lower()) for _ in range(outputs)]
    self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
    return names

  def reshape(self, x: str, *shape: int) -> str:
    """Reshape with ONNX's conventions: 0 keeps that dimension, -1 takes the rest."""
    return self.op("Reshape", x, self.i64(*shape))

  def take(self, x: str, index: int, axis: int) -> str:
    """x's slice `index` along `axis`, that axis dropped."""
    return self.op("Gather", x, self.const(np.array(index, np.int64)), axis=axis)

  def half(self, x: str, which: int, size: int) -> str:
    """The first (which=0) or second half of the last axis of x, which has 2 * size entries."""
    return self.op("Slice", x, self.i64(which * size), self.i64((which + 1) * size), self.i64(-1))


# ---- the NumPy runtime's building blocks (layers.py), same formulas ----------------------------------

def sigmoid(g: Graph, x: str) -> str:
  return g.op("Mul", g.f32(0.5), g.op("Add", g.op("Tanh", g.op("Mul", g.f32(0.5), x)), g.f32(1.0)))


def silu(g: Graph, x: str) -> str:
  return g.op("Mul", x, sigmoid(g, x))


def gelu(g: Graph, x: str) -> str:
  cube = g.op("Mul", g.f32(0.044715), g.op("Mul", g.op("Mul", x, x), x))
  inner = g.op("Mul", g.f32(np.sqrt(2.0 / np.pi)), g.op("Add", x, cube))
  return g.op("Mul", g.op("Mul", g.f32(0.5), x), g.op("Add", g.f32(1.0), g.op("Tanh", inner)))


def rms_norm(g: Graph, x: str, scale: str, eps: float) -> str:
  mean = g.op("ReduceMean", g.op("Mul", x, x), g.i64(-1), keepdims=1)
  return g.op("Mul", g.op("Div", x, g.op("Sqrt", g.op("Add", mean, g.f32(eps)))), scale)


def geglu(g: Graph, x: str, gate_up: str, down: str, width: int) -> str:
  """x [b, t, D], gate_up [D, 2F] (gate columns first), down [F, D]."""
  h = g.op("MatMul", x, gate_up)
  return g.op("MatMul", g.op("Mul", gelu(g, g.half(h, 0, width)), g.half(h, 1, width)), down)


def expm1(g: Graph, x: str) -> str:
  """exp(x) - 1 without cancellation for small |x| (ONNX has no Expm1): tanh(x / 2) (exp(x) + 1)."""
  return g.op("Mul", g.op("Tanh", g.op("Mul", g.f32(0.5), x)), g.op("Add", g.op("Exp", x), g.f32(1.0)))


class Weights:
  """The export's arrays as graph values: float32 initializers, or int8 ones times their scales."""

  def __init__(self, g: Graph, config: dict[str, Any], weights_dtype: str, stored: dict[str, np.ndarray]):
    self.g, self.stored = g, stored
    self.layout = fmt.stored_arrays(config, weights_dtype)
    self.values: dict[str, str] = {}  # name -> its float32 graph value, made once

  def __call__(self, name: str, *shape: int) -> str:
    """Array `name` as float32, reshaped to `shape` when given."""
    if name not in self.values:
      self.values[name] = self._value(name)
    return self.g.reshape(self.values[name], *shape) if shape else self.values[name]

  def _value(self, name: str) -> str:
    entry = self.layout[name]
    if entry["dtype"] == fmt.INT8:
      scale = np.expand_dims(self.stored[name + SCALE_SUFFIX], entry["contraction_axes"])
      return self.g.op("Mul", self.g.op("Cast", self.g.const(self.stored[name], name), to=TensorProto.FLOAT),
                        self.g.const(scale, name + SCALE_SUFFIX))
    return self.g.const(self.array(name), name)

  def array(self, name: str) -> np.ndarray:
    """Array `name` as the NumPy runtime holds it (float32), for values computed once at build time."""
    return fmt.stored_to_float32(self.stored[name], self.layout[name]["dtype"])


# ---- mixers: (g, c, w, prefix, x [b, t, D], position, state inputs) -> (y [b, t, D], state outputs) ---------

def positions(g: Graph, position: str, x: str) -> str:
  """[t] int64: position + 0, 1, ..., t - 1 (the positions of x's tokens)."""
  t = g.op("Gather", g.op("Shape", x), g.i64(1))
  return g.op("Add", position, g.op("Range", g.const(np.array(0, np.int64)), g.op("Squeeze", t), g.const(
      np.array(1, np.int64))))


def mcsd(g: Graph, c: dict[str, Any], w: Weights, p: str, x: str, position: str, state: list[str]):
  """MCSD and mcsd_dd (docs/export.md's steps): state [h [b, 2C, Dc]]."""
  ch, dc = c["channels"], c["width"] // c["channels"]
  xc = g.reshape(x, 0, 0, ch, dc)
  uvef = g.op("Einsum", xc, w(p + "proj"), equation="btcd,cdke->kbtce")
  u, v, e, f = (g.take(uvef, i, 0) for i in range(4))
  log_rates = MCSD(c, {"rate_logits": w.array(p + "rate_logits")} if c["learnable_rates"] else {}).log_rates()
  log_g, log_alpha = log_rates
  if p + "rate_gate" in w.layout:  # mcsd_dd: the decay half gated per token
    gate = g.op("Softplus", g.op("Add", g.op("Einsum", xc, w(p + "rate_gate"), equation="btcd,cd->btc"),
                                 g.f32(GATE_BIAS)))
    decay = g.op("Mul", g.f32(log_alpha), gate)  # [b, t, C]
    slope = g.op("Expand", g.f32(log_g), g.op("Shape", decay))
    rates = g.op("Exp", g.op("Concat", slope, decay, axis=-1))  # [b, t, 2C]
  else:
    batch_time = g.op("Slice", g.op("Shape", x), g.i64(0), g.i64(2), g.i64(0))
    rates = g.op("Expand", g.f32(np.exp(log_rates.reshape(-1))), g.op("Concat", batch_time, g.i64(2 * ch), axis=0))
  rates = g.op("Unsqueeze", rates, g.i64(-1))  # [b, t, 2C, 1]
  history, h = scan_recurrence(g, state[0], g.op("Concat", v, e, axis=2), rates, c["include_current"])
  # Slope: the V history over sum_{j=1..k} g^j (strict past) or sum_{j=0..k} g^j, k = the token's position.
  k = g.op("Unsqueeze", g.op("Cast", positions(g, position, x), to=TensorProto.FLOAT), g.i64(-1))  # [t, 1]
  geometric = g.op("Div", expm1(g, g.op("Mul", k, g.f32(log_g))), g.f32(np.expm1(log_g)))  # [t, C]
  if c["include_current"]:
    z = g.op("Add", geometric, g.op("Exp", g.op("Mul", k, g.f32(log_g))))
  else:
    z = g.op("Mul", g.f32(np.exp(log_g)), geometric)
  z = g.op("Unsqueeze", z, g.i64(-1))  # [t, C, 1]
  positive = g.op("Greater", z, g.f32(0.0))
  v_history = g.op("Slice", history, g.i64(0), g.i64(ch), g.i64(2))
  v_hist = g.op("Where", positive, g.op("Div", v_history, g.op("Where", positive, z, g.f32(1.0))), v)
  theta_s = g.op("Mul", silu(g, v_hist), u)
  e_history = g.op("Slice", history, g.i64(ch), g.i64(2 * ch), g.i64(2))
  theta_d = g.op("Mul", rms_norm(g, e_history, w(p + "decay_norm.scale"), c["norm_eps"]), sigmoid(g, f))
  if c["combine"] == "concat":
    both = g.reshape(g.op("Concat", theta_s, theta_d, axis=2), 0, 0, 2 * c["width"])
    y = g.op("MatMul", both, w(p + "out", 2 * c["width"], c["width"]))
  else:
    y = g.reshape(g.op("Add", theta_s, theta_d), 0, 0, c["width"])
  return y, [h]


def scan_recurrence(g: Graph, h0: str, inputs: str, rates: str, include_current: bool) -> tuple[str, str]:
  """h_n = a_n h_{n-1} + x_n over time, with an ONNX Scan: inputs [b, t, 2C, Dc], rates a [b, t, 2C, 1] ->
  (history [b, t, 2C, Dc]: h_n (include_current) or a_n h_{n-1}, final h [b, 2C, Dc])."""
  body = Graph(prefix=f"{h0}.scan.")  # names unique in the model: h0 is the layer's state input
  h, x, a = (body.prefix + name for name in ("h", "x", "a"))
  new_h = body.op("Add", body.op("Mul", a, h), x)
  read = body.op("Identity", new_h) if include_current else body.op("Mul", a, h)  # a second output: its own name
  value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
  graph = helper.make_graph(body.nodes, "recurrence", [value(h), value(x), value(a)], [value(new_h), value(read)],
                            body.initializers)
  h, history = g.ops("Scan", [h0, inputs, rates], 2, body=graph, num_scan_inputs=2, scan_input_axes=[1, 1],
                     scan_output_axes=[1])
  return history, h


def rope(g: Graph, x: str, pos: str, c: dict[str, Any]) -> str:
  """x [b, t, H, Dh] rotated to its tokens' positions pos [t] (rotate-half, numpy_runtime/attention.py)."""
  half = c["width"] // c["heads"] // 2
  freq = (F32(c["rope_theta"]) ** (-np.arange(half, dtype=F32) / F32(half))).astype(F32)
  angle = g.op("Mul", g.reshape(g.op("Cast", pos, to=TensorProto.FLOAT), -1, 1, 1), g.f32(freq))  # [t, 1, Dh/2]
  cos, sin = g.op("Cos", angle), g.op("Sin", angle)
  x1, x2 = g.half(x, 0, half), g.half(x, 1, half)
  return g.op("Concat", g.op("Sub", g.op("Mul", x1, cos), g.op("Mul", x2, sin)),
              g.op("Add", g.op("Mul", x2, cos), g.op("Mul", x1, sin)), axis=-1)


def attend(g: Graph, c: dict[str, Any], w: Weights, p: str, q: str, keys: str, values: str, allowed: str) -> str:
  """q [b, t, H, Dh] over keys, values [b, s, H, Dh] where allowed [t, s] -> [b, t, D] (output projection)."""
  heads, dh = c["heads"], c["width"] // c["heads"]
  scores = g.op("Div", g.op("Einsum", q, keys, equation="bthe,bshe->bhts"), g.f32(np.sqrt(dh)))
  scores = g.op("Where", allowed, scores, g.f32(-np.inf))
  attended = g.op("Einsum", g.op("Softmax", scores, axis=-1), values, equation="bhts,bshe->bthe")
  return g.op("MatMul", g.reshape(attended, 0, 0, heads * dh), w(p + "out", heads * dh, c["width"]))


def project_in(g: Graph, c: dict[str, Any], w: Weights, p: str, x: str, pos: str) -> tuple[str, str, str]:
  heads, dh = c["heads"], c["width"] // c["heads"]
  qkv = g.reshape(g.op("MatMul", x, w(p + "qkv", c["width"], 3 * heads * dh)), 0, 0, 3, heads, dh)
  q, k, v = (g.take(qkv, i, 2) for i in range(3))
  return rope(g, q, pos, c), rope(g, k, pos, c), v


def attention(g: Graph, c: dict[str, Any], w: Weights, p: str, x: str, position: str, state: list[str]):
  """Causal attention: state [k, v [b, s, H, Dh]], the keys (after RoPE) and values of the s = position tokens
  before; the outputs hold s + t."""
  pos = positions(g, position, x)
  q, k, v = project_in(g, c, w, p, x, pos)
  keys, values = g.op("Concat", state[0], k, axis=1), g.op("Concat", state[1], v, axis=1)
  key_pos = g.op("Range", g.const(np.array(0, np.int64)), g.op("Squeeze", g.op("Gather", g.op("Shape", keys),
                                                                             g.i64(1))), g.const(np.array(1, np.int64)))
  allowed = g.op("LessOrEqual", g.op("Unsqueeze", key_pos, g.i64(0)), g.op("Unsqueeze", pos, g.i64(1)))
  return attend(g, c, w, p, q, keys, values, allowed), [keys, values]


def window_attention(g: Graph, c: dict[str, Any], w: Weights, p: str, x: str, position: str, state: list[str]):
  """Sliding-window attention: state [k, v [b, W, H, Dh]], the latest W tokens' keys and values, oldest first
  (row j holds position `position` - W + j; rows of negative positions are never attended)."""
  window = c["window"]
  pos = positions(g, position, x)
  q, k, v = project_in(g, c, w, p, x, pos)
  keys, values = g.op("Concat", state[0], k, axis=1), g.op("Concat", state[1], v, axis=1)
  key_pos = g.op("Concat", g.op("Sub", g.op("Add", position, g.const(np.arange(window, dtype=np.int64))),
                                g.const(np.array(window, np.int64))), pos, axis=0)  # [W + t]
  offset = g.op("Sub", g.op("Unsqueeze", pos, g.i64(1)), g.op("Unsqueeze", key_pos, g.i64(0)))  # [t, W + t]
  allowed = g.op("And", g.op("And", g.op("GreaterOrEqual", offset, g.const(np.array(0, np.int64))),
                             g.op("Less", offset, g.const(np.array(window, np.int64)))),
                 g.op("Unsqueeze", g.op("GreaterOrEqual", key_pos, g.const(np.array(0, np.int64))), g.i64(0)))
  last = lambda a: g.op("Slice", a, g.i64(-window), g.i64(np.iinfo(np.int64).max), g.i64(1))  # noqa: E731
  return attend(g, c, w, p, q, keys, values, allowed), [last(keys), last(values)]


def state_shapes(mixer: str, c: dict[str, Any]) -> dict[str, list]:
  """One layer's state tensors (names after `state.{i}.`) -> shape, "batch" and "past" symbolic."""
  if mixer in ("mcsd", "mcsd_dd"):
    return {"h": ["batch", 2 * c["channels"], c["width"] // c["channels"]]}
  kv = ["batch", "past" if mixer == "attention" else c["window"], c["heads"], c["width"] // c["heads"]]
  return {"k": kv, "v": list(kv)}


# A mixer's graph form; a mixer of numpy_runtime/mixers.py missing here cannot be exported as ONNX.
ONNX_FORMS: dict[str, Callable] = {"mcsd": mcsd, "mcsd_dd": mcsd, "attention": attention, "swa": window_attention}


def check_onnx_config(config: dict[str, Any], where: str = "--onnx") -> None:
  """Raises ExportError (one line) when a mixer of the config's pattern has no ONNX form."""
  missing = [m for m in dict.fromkeys(config["pattern"]) if m not in ONNX_FORMS]
  if missing:
    raise fmt.ExportError(f"{where}: mixer(s) {missing} of model.pattern have no ONNX form (ONNX forms exist for "
                          f"{', '.join(ONNX_FORMS)}); export without --onnx and run it with the NumPy runtime")


# ---- FFNs and the model -----------------------------------------------------------------------------

def selective_ffn(g: Graph, c: dict[str, Any], w: Weights, p: str, x: str) -> str:
  """Every token's top-k groups weighted by the router's probabilities (renormalised over k when k > 1). When the
  call has fewer chosen groups than the layer has (b t k < E: a decode step), each token's k groups are gathered
  and only they are read; otherwise (a prefill) all E groups run and the unchosen are weighted by 0."""
  groups, k = c["groups"], c["top_k"]
  router = g.op("MatMul", gelu(g, g.op("MatMul", x, w(p + "router_in"))), w(p + "router_out"))
  probs = g.op("Softmax", router, axis=-1)  # [b, t, E]
  gates, chosen = g.ops("TopK", [probs, g.i64(k)], 2, axis=-1, largest=1, sorted=1)  # lower id first on ties
  if k > 1:
    gates = g.op("Div", gates, g.op("ReduceSum", gates, g.i64(-1), keepdims=1))
  batch_time = g.op("ReduceProd", g.op("Slice", g.op("Shape", x), g.i64(0), g.i64(2), g.i64(0)), keepdims=0)
  few = g.op("Less", g.op("Mul", batch_time, g.const(np.array(k, np.int64))), g.const(np.array(groups, np.int64)))
  branches = {}
  for name, form in (("then_branch", chosen_groups), ("else_branch", all_groups)):
    body = Graph(prefix=f"{p}{form.__name__}_")
    y = form(body, c, w, p, x, chosen, gates)
    output = helper.make_tensor_value_info(y, TensorProto.FLOAT, None)
    branches[name] = helper.make_graph(body.nodes, form.__name__, [], [output], body.initializers)
  return g.op("If", few, **branches)


def chosen_groups(g: Graph, c: dict[str, Any], w: Weights, p: str, x: str, chosen: str, gates: str) -> str:
  """x [b, t, D] through each token's chosen groups chosen [b, t, k], weighted by gates [b, t, k]: their weights
  gathered ([b, t, k, D, 2 g] and [b, t, k, g, D]) and applied as batched matrix-vector products."""
  width, size = c["width"], c["mlp_width"] // c["groups"]
  gate_up = g.op("Gather", w(p + "gate_up", c["groups"], width, 2 * size), chosen, axis=0)
  h = g.op("MatMul", g.op("Unsqueeze", x, g.i64(2, 3)), gate_up)  # [b, t, k, 1, 2 g]
  act = g.op("Mul", g.op("Mul", gelu(g, g.half(h, 0, size)), g.half(h, 1, size)),
             g.reshape(gates, 0, 0, -1, 1, 1))  # [b, t, k, 1, g]
  y = g.op("MatMul", act, g.op("Gather", w(p + "down"), chosen, axis=0))  # [b, t, k, 1, D]
  return g.op("ReduceSum", y, g.i64(2, 3), keepdims=0)


def all_groups(g: Graph, c: dict[str, Any], w: Weights, p: str, x: str, chosen: str, gates: str) -> str:
  """x [b, t, D] through all E groups, each weighted by its gate where chosen, else 0."""
  one_hot = g.op("OneHot", chosen, g.const(np.array(c["groups"], np.int64)), g.const(np.array([0, 1], F32)),
                 axis=-1)  # [b, t, k, E]
  weight = g.op("ReduceSum", g.op("Mul", one_hot, g.op("Unsqueeze", gates, g.i64(-1))), g.i64(2), keepdims=0)
  h = g.op("Einsum", x, w(p + "gate_up"), equation="btd,edkg->btekg")  # gate_up [E, D, 2, g]
  act = g.op("Mul", g.op("Mul", gelu(g, g.take(h, 0, 3)), g.take(h, 1, 3)), g.op("Unsqueeze", weight, g.i64(-1)))
  return g.op("Einsum", act, w(p + "down"), equation="bteg,egd->btd")


def build_graph(manifest: dict[str, Any], stored: dict[str, np.ndarray]) -> onnx.ModelProto:
  """The ONNX model of `export` (load_export's) from its stored arrays `stored` (read_npz / read_safetensors of
  its weights file; int8 matrices and scales are taken from there). ExportError for a mixer without ONNX form."""
  c = fmt.check_config(manifest["config"])
  check_onnx_config(c)
  g = Graph()
  w = Weights(g, manifest["config"], manifest["weights_dtype"], stored)
  mixers = layer_mixers(c["pattern"], c["layers"])
  inputs = [helper.make_tensor_value_info(TOKENS, TensorProto.INT64, ["batch", "time"]),
            helper.make_tensor_value_info(POSITION, TensorProto.INT64, [])]
  outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", "time", c["vocab_size"]])]
  x = g.op("Gather", w("embed.embedding"), TOKENS, axis=0)  # [b, t, D]
  for i, mixer in enumerate(mixers):
    p = f"blocks.{i}."
    shapes = state_shapes(mixer, c)
    names = [f"state.{i}.{n}" for n in shapes]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip(names, shapes.values())]
    h, new_state = ONNX_FORMS[mixer](g, c, w, p + "mixer.", rms_norm(g, x, w(p + "mixer_norm.scale"),
                                                                     c["norm_eps"]), POSITION, names)
    for name, value, shape in zip(names, new_state, shapes.values()):
      out = "next_" + name
      g.nodes.append(helper.make_node("Identity", [value], [out]))
      outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [
          "past_plus_time" if s == "past" else s for s in shape]))
    x = g.op("Add", x, h)
    h = rms_norm(g, x, w(p + "ffn_norm.scale"), c["norm_eps"])
    if c["router"]:
      h = selective_ffn(g, c, w, p + "ffn.", h)
    else:
      h = geglu(g, h, w(p + "ffn.gate_up", c["width"], 2 * c["mlp_width"]), w(p + "ffn.down"), c["mlp_width"])
    x = g.op("Add", x, h)
  x = g.reshape(rms_norm(g, x, w("final_norm.scale"), c["norm_eps"]), -1, c["width"])
  head = (g.op("Gemm", x, w("embed.embedding"), transB=1) if c["tie_embeddings"]
          else g.op("Gemm", x, w("head")))  # [b t, V]
  batch_time = g.op("Slice", g.op("Shape", TOKENS), g.i64(0), g.i64(2), g.i64(0))
  g.nodes.append(helper.make_node("Reshape", [head, g.op("Concat", batch_time, g.i64(c["vocab_size"]), axis=0)],
                                  [LOGITS]))
  graph = helper.make_graph(g.nodes, "yanjax", inputs, outputs, g.initializers)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                            producer_name="yanjax", doc_string=f"yanjax export: {manifest['weights_dtype']}")
  model.ir_version = 9  # onnxruntime reads IR versions up to its own; 9 is opset 18's
  return model


def stored_weights(directory, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
  """The arrays of the export's weights file in `directory` as stored (int8 matrices, their scales; bfloat16 as
  uint16 bits)."""
  file = directory / fmt.WEIGHT_FILES[manifest["weights_format"]]
  return fmt.read_npz(file) if manifest["weights_format"] == "npz" else fmt.read_safetensors(file)


def save_graph(model: onnx.ModelProto, directory) -> None:
  """Writes `model` as fmt.ONNX and its weights (initializers over 1 KiB) as fmt.ONNX_DATA into the local
  `directory`."""
  onnx.save_model(model, str(directory / fmt.ONNX), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=fmt.ONNX_DATA, size_threshold=1024)
