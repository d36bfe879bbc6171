"""The plan of a run before its launch: mesh, per-device memory, tokens, steps, FLOPs and step time.

    python -m yanjax.main.plan --config configs/yan_1p6b.py --devices 256 --device_kind "H100 80GB"
        [--mfu 0.4] [--json] [--compile] [--config.train.grad_accum=2 ...]

Nothing is allocated. Parameter and optimizer-state shapes come from `jax.eval_shape`; their per-device bytes
from the trainer's placement (`yanjax.training.train_state.train_state_shardings`) on an `AbstractMesh` of the
requested size; activations from the formula below, whose [b, t, ...] terms are placed by the same rules table
(a term on "mlp" is split over "tensor" where it divides, and so on).
`--compile` also compiles the sharded train step on the local devices (when there are exactly --devices of
them: on the target machine, or on CPU with --local_device_count) and prints XLA's memory analysis beside
the prediction. The trainer calls `check_fits` at start-up, before compiling anything.

Memory per device. Sizes: the legend in docs/model.md (D, F, L, V, H, T = seq_len, E, k, R, g, p, and
c = `dispatch.group_capacity` ~ 1.25 T k / E). Here also: M = parameter bytes per device (float32); n = tokens
per device per micro-batch (global_batch / grad_accum / batch-parallel devices x T / sequence-parallel devices:
mesh.sequence splits each sequence's time); a = bytes of model.dtype.

  total       = state + max(activation phase, update phase)
  state       = M + 2 M (AdamW moments) + the batch (20 bytes per token of the whole step)
  update      = 3 M: gradient accumulator, one micro-batch's gradients, the update (measured on CPU)
  activation  = 2 M + gathered + n L saved + max(n working, logits)
  saved       per layer and token, what autodiff keeps at model.remat (counted from JAX's saved residuals):
                full       D a                                            the layer input
                save_dots  2 D a + dense 2 F a | selective (R + E) 4      matmul outputs without batch dims
                none       everything: norms 4 D 4; MCSD 10 D 4 + 2 D a (mcsd_dd: + 4 D 4 + D a + 2 C 4) |
                           attention 6 D a + H T (4 + a) (XLA), 6 D a + 4 H + T (cuDNN, which a bfloat16
                           run on an NVIDIA device kind takes: `attention_kernel.planned`; no [t, t] scores);
                           dense FFN 8 F a | selective: router (6 R + 2 E + 3 k) 4 + dispatch, with
                           r = E c / T ~ 1.25 k slots per token: capacity 2 k E 4 + r (2 D + 3 g) a + k D a;
                           dropless k (3 D + 3 g) a, + 3 p k D a over p > 1 expert devices (all-to-all
                           buffers, worst case), + 2 k E (D + g) a on CPU (XLA's ragged_dot runs every group;
                           on CPU tokamax runs it too, its kernels being GPU and TPU ones)
  sequence    with time split over S > 1 devices, attention (and sliding-window attention on segments T / S < W)
              keeps the other segments' keys and values, 2 (S - 1) D a per token of a device's segment
  working     one layer's backward: its `none` residuals recomputed, plus attention's logits cotangent H T 4
              (cuDNN: T a, the document mask's cotangent, which jax 0.11 computes);
              the largest layer's, or, scanned, one repetition's of the pattern (its P layers together)
  logits      n_chunk 2 V 4 (one loss chunk's float32 logits and their cotangent; n_chunk = tokens per device in
              a chunk of min(`train.loss_chunk`, T) positions, all T when 0; yanjax/model/head.py) + n 4 D 4 (the
              final norm in float32)
  gathered    FSDP all-gathers: float32 weights of 2 P layers (scanned) or every layer (unscanned; the CPU
              compiler keeps them all), plus the embedding; with remat none, every layer's weights cast to a

Every selective term is linear in T (c grows with T, but per token r = E c / T stays ~ 1.25 k).
XLA's memory analysis of the compiled step agrees within 0.66-1.14x on CPU (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from yanjax.core.config import ConfigError
from yanjax.model import attention_kernel
from yanjax.model.config import ModelConfig
from yanjax.model.counting import flops_per_token, param_count
from yanjax.model.dispatch import group_capacity
from yanjax.model.lm import LanguageModel
from yanjax.model.mixers import MIXERS
from yanjax.model.partitioning import Term
from yanjax.training import sharding
from yanjax.training.metrics import peak_flops
from yanjax.training.optim import decay_mask, make_optimizer
from yanjax.training.run_config import MESH_AXES, tokens_per_step, validate_run_config
from yanjax.training.train_state import train_state_shardings

# HBM per device from vendor data sheets, in bytes (GB = 1e9). Matched by the most specific key whose words all
# appear in the device kind (e.g. 'NVIDIA H100 80GB HBM3' -> "H100").
DEVICE_MEMORY = {
    "H100": 80e9,
    "H100 80GB": 80e9,
    "H100 NVL": 94e9,
    "H200": 141e9,
    "A100": 40e9,
    "A100 80GB": 80e9,
    "L4": 24e9,
    "TPU v4": 32e9,
    "TPU v5 lite": 16e9,  # v5e
    "TPU v5e": 16e9,
    "TPU v5": 95e9,  # v5p
    "TPU v5p": 95e9,
    "TPU v6 lite": 32e9,  # v6e (Trillium)
    "TPU v6e": 32e9,
}
HEADROOM = 0.9  # check_fits refuses a run predicted above this fraction of the device's memory
MEMORY_ENV = "YANJAX_DEVICE_MEMORY_BYTES"  # overrides the capacity (e.g. 60e9); 0 turns the check off
DEFAULT_MFU = 0.4
KNOBS = ("train.grad_accum", "mesh.fsdp", "mesh.sequence", "model.remat", "train.global_batch")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run needs per device, and how long its steps take. Bytes are per device."""
  config: str
  devices: int
  device_kind: str
  mesh: dict[str, int]
  batch_ways: int  # devices the batch is split over (product of the "batch" rule's mesh axes)
  length_ways: int  # devices each sequence's time is split over (the "length" rule's: mesh.sequence)
  micro_batch_per_device: int  # sequences per device per micro-batch
  seq_len: int
  loss_chunk: int  # positions whose logits the loss holds at a time (train.loss_chunk; seq_len when 0)
  grad_accum: int
  remat: str
  dtype: str
  attention_kernel: str | None  # what the attention layers' training passes run on this device kind; None: none
  params_total: int  # parameters of the model
  param_bytes: int
  optimizer_bytes: int
  batch_bytes: int
  update_bytes: int  # the update phase: gradients and the update
  gradient_bytes: int  # during the backward: accumulator and one micro-batch's gradients
  gathered_bytes: int
  saved_bytes: int  # all layers' saved activations
  working_bytes: int
  logits_bytes: int
  tokens_per_step: int
  steps: int
  flops_per_step: float
  mfu: float
  peak_flops: float | None
  capacity_bytes: float | None

  @property
  def segment_len(self) -> int:
    """Positions of each sequence on one device."""
    return self.seq_len // self.length_ways

  @property
  def activation_phase_bytes(self) -> int:
    return self.gradient_bytes + self.gathered_bytes + self.saved_bytes + max(self.working_bytes,
                                                                              self.logits_bytes)

  @property
  def state_bytes(self) -> int:
    return self.param_bytes + self.optimizer_bytes + self.batch_bytes

  @property
  def total_bytes(self) -> int:
    return self.state_bytes + max(self.activation_phase_bytes, self.update_bytes)

  @property
  def step_time_s(self) -> float | None:
    if self.peak_flops is None:
      return None
    return self.flops_per_step / (self.devices * self.peak_flops * self.mfu)

  @property
  def fits(self) -> bool | None:
    return None if not self.capacity_bytes else self.total_bytes <= HEADROOM * self.capacity_bytes

  def to_dict(self) -> dict[str, Any]:
    values = dataclasses.asdict(self)
    values.update(activation_phase_bytes=self.activation_phase_bytes, state_bytes=self.state_bytes,
                  total_bytes=self.total_bytes, step_time_s=self.step_time_s, fits=self.fits,
                  headroom=HEADROOM)
    return values


def gigabytes(value: float) -> str:
  return f"{value / 1e9:,.2f} GB" if value >= 1e8 else f"{value / 1e6:,.1f} MB"


# ---- capacities ----------------------------------------------------------------------------------------


def _words(text: str) -> set[str]:
  return set(re.findall(r"[a-z0-9]+", text.lower()))


def table_memory(device_kind: str) -> float | None:
  """HBM bytes of the DEVICE_MEMORY entry with the most words, all of them in `device_kind`; None if none."""
  kind = _words(device_kind)
  matches = [key for key in DEVICE_MEMORY if _words(key) <= kind]
  return DEVICE_MEMORY[max(matches, key=lambda k: len(_words(k)))] if matches else None


def device_memory(device_kind: str, local: jax.Device | None = None) -> float | None:
  """Bytes one device of `device_kind` offers to a run; None when unknown (CPU, an unlisted kind).

  In order: $YANJAX_DEVICE_MEMORY_BYTES (0: unknown, no check); the allocator's limit of `local`, an
  accelerator of that kind (it reflects XLA_PYTHON_CLIENT_MEM_FRACTION on GPUs); the DEVICE_MEMORY table.
  """
  if os.environ.get(MEMORY_ENV):
    try:
      value = float(os.environ[MEMORY_ENV])
    except ValueError:
      raise ConfigError(f"${MEMORY_ENV}={os.environ[MEMORY_ENV]!r} must be a number of bytes (0: no check)") from None
    return value or None
  if local is not None and local.platform != "cpu" and local.device_kind == device_kind:
    limit = (local.memory_stats() or {}).get("bytes_limit")
    if limit:
      return float(limit)
  return table_memory(device_kind)


# ---- the plan ----------------------------------------------------------------------------------------------


def abstract_mesh(mesh_cfg, devices: int) -> jax.sharding.AbstractMesh:
  """The config's mesh over `devices` devices (-1 filled as the trainer does), without any device."""
  shape = sharding.mesh_shape(dict(mesh_cfg), devices)
  return jax.sharding.AbstractMesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _shard_bytes(shape: Sequence[int], itemsize: int, spec, mesh_shape: dict[str, int]) -> int:
  """Bytes of one device's shard of an array of `shape` placed by PartitionSpec `spec`."""
  size = 1
  for i, dim in enumerate(shape):
    entry = spec[i] if i < len(spec) else None
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    size *= dim // math.prod(mesh_shape[n] for n in names)
  return size * itemsize


def _state_bytes(model_cfg: ModelConfig, cfg, mesh, rules) -> dict[str, int]:
  """Per-device bytes of parameters and optimizer state, and of the weights the compute gathers.

  Every repetition of the layer pattern has the same parameters, placed alike (where the rules split no "layers"
  axis), so each count is linear in the L / P repetitions: it is traced for 1 and 2 and extrapolated, in seconds
  whatever L (tracing thousands of layers takes minutes).
  """
  period = len(model_cfg.pattern)
  repeats = model_cfg.layers // period
  if repeats <= 2 or rules.get("layers"):
    return _traced_state_bytes(model_cfg, cfg, mesh, rules)
  one, two = (_traced_state_bytes(model_cfg.replace(layers=n * period), cfg, mesh, rules) for n in (1, 2))
  return {key: two[key] + (repeats - 2) * (two[key] - one[key]) for key in two}


def _traced_state_bytes(model_cfg: ModelConfig, cfg, mesh, rules) -> dict[str, int]:
  """`_state_bytes` from the shapes of the whole model (`jax.eval_shape`)."""
  _, abstract = nnx.split(nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(0))))
  optimizer = make_optimizer(cfg.optimizer, max(cfg.train.steps, 1), decay_mask(abstract))
  shardings = train_state_shardings(abstract, optimizer, rules, mesh)
  params = nnx.to_pure_dict(abstract)
  opt_state = jax.eval_shape(optimizer.init, params)
  mesh_shape = dict(mesh.shape)
  no_batch = {**mesh_shape, **{a: 1 for a in rules.get("batch", ())}}  # a shard with batch axes gathered

  def total(tree, tree_shardings, shape=mesh_shape):
    return sum(_shard_bytes(a.shape, np.dtype(a.dtype).itemsize, s.spec, shape)
               for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_shardings)))

  blocks = {k: v for k, v in params.items() if k == "blocks"}
  other = {k: v for k, v in params.items() if k != "blocks"}
  return {"params": total(params, shardings["params"]), "optimizer": total(opt_state, shardings["opt_state"]),
          "blocks_gathered": total(blocks, {"blocks": shardings["params"]["blocks"]}, no_batch) if blocks else 0,
          "blocks_sharded": total(blocks, {"blocks": shardings["params"]["blocks"]}) if blocks else 0,
          "other_gathered": total(other, {k: shardings["params"][k] for k in other}, no_batch)}


def layer_terms(m: ModelConfig, mixer: str, t: int, remat: str, dense_ragged: bool = False,
                expert_ways: int = 1, length_ways: int = 1) -> list[Term]:
  """Activations one layer with mixer `mixer` keeps for its backward at `remat`, per [b, t] position (dense_ragged,
  expert_ways: see `dispatch_terms`; length_ways: see `sequence_terms`)."""
  a = jnp.dtype(m.dtype).itemsize
  d, f = m.width, m.mlp_width
  if remat == "full":
    return [Term("layer input", (d,), ("embed",), a)]
  if remat == "save_dots":
    terms = [Term("layer input, mixer output", (d,), ("embed",), a, 2)]
    if m.router:
      return terms + [Term("router hidden", (m.router_hidden,), (None,), 4),
                      Term("router logits", (m.groups,), ("experts",), 4)]
    return terms + [Term("FFN gate and up", (2, f), (None, "mlp"), a)]
  terms = [Term("norms (float32)", (d,), ("embed",), 4, 4), *MIXERS[mixer].residual_terms(m, t, a),
           *sequence_terms(m, mixer, t, length_ways)]
  if not m.router:
    return terms + [Term("GeGLU hidden", (f,), ("mlp",), a, 8)]
  return terms + [Term("router hidden", (m.router_hidden,), (None,), 4, 6),
                  Term("router logits, probabilities", (m.groups,), ("experts",), 4, 2),
                  *dispatch_terms(m, t, dense_ragged, expert_ways)]


def sequence_terms(m: ModelConfig, mixer: str, t: int, length_ways: int) -> list[Term]:
  """What splitting time over `length_ways` devices adds to a layer, per token of a device's segment: attention's
  keys and values of the other segments, gathered whole on every device (sliding-window attention on segments of
  at least W tokens reads only the neighbour's last W: counted as nothing)."""
  if length_ways == 1 or mixer not in attention_kernel.ATTENTION_MIXERS or (
      mixer == "swa" and t // length_ways >= m.window):
    return []
  return [Term("k, v of the other segments (all-gathered)", (m.heads, m.head_dim), ("heads", None),
               jnp.dtype(m.dtype).itemsize, 2 * (length_ways - 1))]


def dispatch_terms(m: ModelConfig, t: int, dense_ragged: bool, expert_ways: int) -> list[Term]:
  """What the token dispatch of a selective layer keeps, per token (yanjax.model.dispatch): linear in t.

  dense_ragged: the grouped matmul is evaluated densely over all E groups: XLA's ragged_dot on CPU, which every
    `model.grouped_matmul` runs there (tokamax's kernels, which run only each group's rows, are GPU and TPU ones).
  expert_ways: devices on the expert axis (the all-to-all buffers hold the worst case, p k rows per token).
  """
  a = jnp.dtype(m.dtype).itemsize
  d, e, k, g = m.width, m.groups, m.top_k, m.group_width
  terms = [Term("top-k choices and gates", (k,), (None,), 4, 3)]
  if m.dispatch == "capacity":
    rows = e * group_capacity(t, e, k, m.capacity_factor) / t  # slots per token, filled or not
    return terms + [
        Term("queue one-hots and positions (int32)", (k, e), (None, None), 4, 2),
        Term("dispatched rows and their outputs [E, c, D]", (d,), (None,), a, 2 * rows),
        Term("group GeGLU hidden [E, c, 3 g]", (g,), ("mlp",), a, 3 * rows),
        Term("gathered slot outputs [k, D]", (k, d), (None, None), a)]
  terms += [Term("token-slot rows: copies, sorted, outputs [k, D]", (k, d), (None, None), a, 3),
            Term("grouped GeGLU hidden [k, 3 g]", (k, g), (None, "mlp"), a, 3)]
  if expert_ways > 1:
    terms.append(Term("all-to-all buffers: sent, received, returned [p k, D]", (expert_ways * k, d), (None, None),
                      a, 3))
  if dense_ragged:
    terms.append(Term("ragged_dot evaluated densely: masked rows [k, E, D] and [k, E, g]", (k, e, d + g),
                      (None, None, None), a, 2))
  return terms


def working_terms(m: ModelConfig, mixer: str, t: int, dense_ragged: bool = False, expert_ways: int = 1,
                  length_ways: int = 1) -> list[Term]:
  """The backward of one layer with mixer `mixer`: its residuals recomputed, plus what its mixer's backward adds
  (attention's logits cotangent)."""
  return (layer_terms(m, mixer, t, "none", dense_ragged, expert_ways, length_ways) +
          MIXERS[mixer].backward_terms(m, t))


def logits_terms(m: ModelConfig, t: int, loss_chunk: int, length_ways: int = 1) -> list[tuple[list[Term], int]]:
  """What the loss holds, as (terms, positions) pairs: one chunk's logits (`loss_chunk` positions of each of the
  `length_ways` segments of a sequence split over devices, yanjax/model/head.py) beside the final norm of all t."""
  chunk_positions = min(loss_chunk, t // length_ways) * length_ways
  return [([Term("logits and cotangent (float32)", (m.vocab_size,), ("vocab",), 4, 2)], chunk_positions),
          ([Term("final norm (float32)", (m.width,), ("embed",), 4, 4)], t)]


def terms_bytes(terms: Sequence[Term], batch: int, t: int, mesh, rules) -> int:
  """Per-device bytes of `terms` for a micro-batch of `batch` sequences (global) of length `t`."""
  total = 0.0
  for term in terms:
    shape = (batch, t) + term.dims
    spec = sharding.logical_to_spec(("batch", "length") + term.axes, shape, rules, mesh)
    total += term.count * _shard_bytes(shape, term.itemsize, spec, dict(mesh.shape))
  return int(total)


def make_plan(cfg: ml_collections.ConfigDict, devices: int, device_kind: str, mfu: float = DEFAULT_MFU,
              config_name: str = "", capacity_bytes: float | None = None) -> Plan:
  """The plan of run config `cfg` on `devices` devices of `device_kind`; raises ConfigError for a bad config.

  `capacity_bytes`: memory per device (None: `device_memory(device_kind)`, from the table; no device is touched).
  """
  model_cfg = validate_run_config(cfg)
  mesh = abstract_mesh(cfg.mesh, devices)
  rules = {name: tuple(axes) for name, axes in cfg.rules}
  train = cfg.train
  sharding.check_batch_divides(train.global_batch, train.grad_accum, train.seq_len, mesh, rules)
  batch_ways, length_ways = (sharding.axis_ways(mesh, rules, name) for name in ("batch", "length"))
  micro = train.global_batch // train.grad_accum
  # Attention's memory depends on its kernel: what a device of this kind would run (XLA's [t, t] scores or cuDNN).
  model_cfg = model_cfg.replace(attention_kernel=attention_kernel.planned(model_cfg, device_kind, train.seq_len,
                                                                          length_ways))
  state = _state_bytes(model_cfg, cfg, mesh, rules)
  t = train.seq_len
  loss_chunk = min(train.loss_chunk or t, t)
  p = state["params"]
  per_layer_gathered = state["blocks_gathered"] // model_cfg.layers
  fsdp_gathers = state["blocks_gathered"] > state["blocks_sharded"]
  gathered = 0
  if fsdp_gathers:
    # Scanned, XLA holds two repetitions of the pattern gathered (the one running and the next one's prefetch).
    gathered = min(2 * len(model_cfg.pattern) if model_cfg.scan_layers else model_cfg.layers,
                   model_cfg.layers) * per_layer_gathered
    gathered += state["other_gathered"]
  if model_cfg.remat == "none" and model_cfg.dtype != "float32":
    gathered += state["blocks_gathered"] * jnp.dtype(model_cfg.dtype).itemsize // 4
  dispatch = (device_kind.lower() == "cpu", mesh.shape["expert"], length_ways)
  saved = sum(terms_bytes(layer_terms(model_cfg, mixer, t, model_cfg.remat, *dispatch), micro, t, mesh, rules)
              for mixer in model_cfg.layer_mixers)
  working = [terms_bytes(working_terms(model_cfg, mixer, t, *dispatch), micro, t, mesh, rules)
             for mixer in model_cfg.pattern]
  # The backward holds one layer's working set at a time, or, scanned, one repetition's: the pattern's P layers.
  working = sum(working) if model_cfg.scan_layers else max(working)
  tokens = tokens_per_step(cfg)
  return Plan(
      config=config_name, devices=devices, device_kind=device_kind, mesh=dict(mesh.shape), batch_ways=batch_ways,
      length_ways=length_ways, micro_batch_per_device=micro // batch_ways, seq_len=t, loss_chunk=loss_chunk,
      grad_accum=train.grad_accum,
      remat=model_cfg.remat, dtype=model_cfg.dtype,
      attention_kernel=model_cfg.attention_kernel if set(model_cfg.pattern) & set(attention_kernel.ATTENTION_MIXERS)
      else None, params_total=param_count(model_cfg).total, param_bytes=p,
      optimizer_bytes=state["optimizer"], batch_bytes=20 * train.global_batch * t // (batch_ways * length_ways),
      update_bytes=3 * p, gradient_bytes=2 * p, gathered_bytes=gathered, saved_bytes=saved,
      working_bytes=working,
      logits_bytes=sum(terms_bytes(terms, micro, positions, mesh, rules)
                       for terms, positions in logits_terms(model_cfg, t, loss_chunk, length_ways)),
      tokens_per_step=tokens, steps=train.steps, flops_per_step=flops_per_token(model_cfg, t) * tokens, mfu=mfu,
      peak_flops=peak_flops(device_kind),
      capacity_bytes=device_memory(device_kind) if capacity_bytes is None else capacity_bytes)


# ---- the start-up check ------------------------------------------------------------------------------------


def fitting_change(cfg: ml_collections.ConfigDict, devices: int, device_kind: str, capacity: float | None) -> str:
  """The first change that fits, as 'key=value ... fits (X GB)': a larger train.grad_accum (that still divides
  the batch over the devices), model.remat='full', then both, then a larger mesh.sequence (each sequence split over
  more devices, taken from the axis that fills the devices); '' when none of them fits."""
  ways = math.prod(sharding.mesh_shape(dict(cfg.mesh), devices)[MESH_AXES.index(a)]
                   for a in dict((n, tuple(x)) for n, x in cfg.rules).get("batch", ()))
  accums, accum = [], cfg.train.grad_accum * 2
  while cfg.train.global_batch % accum == 0 and (cfg.train.global_batch // accum) % ways == 0:
    accums.append(accum)
    accum *= 2
  tries = [{"train.grad_accum": a} for a in accums]
  if cfg.model.remat != "full":
    tries += [{"model.remat": "full"}] + [{"train.grad_accum": a, "model.remat": "full"} for a in accums]
  if cfg.mesh.sequence > 0 and -1 in dict(cfg.mesh).values():
    tries += [{"mesh.sequence": cfg.mesh.sequence * 2 ** k} for k in range(1, int(math.log2(devices)) + 1)]
  for changes in tries:
    trial = ml_collections.ConfigDict(cfg.to_dict())
    for key, value in changes.items():
      section, name = key.split(".")
      trial[section][name] = value
    try:
      plan = make_plan(trial, devices, device_kind, capacity_bytes=capacity)
    except ConfigError:  # a split that does not divide the devices, the batch or the sequence
      continue
    if plan.fits:
      return " ".join(f"{key}={value!r}" for key, value in changes.items()) + f" fits ({gigabytes(plan.total_bytes)})"
  return ""


def check_fits(cfg: ml_collections.ConfigDict, devices: int, device_kind: str) -> Plan:
  """The plan of `cfg` on `devices` x `device_kind`; raises ConfigError if it needs more than HEADROOM of a
  device's memory. Never refuses where the memory is unknown (CPU, an unlisted kind, $YANJAX_DEVICE_MEMORY_BYTES=0)."""
  plan = make_plan(cfg, devices, device_kind, capacity_bytes=device_memory(device_kind, jax.local_devices()[0]))
  if plan.fits is False:
    change = fitting_change(cfg, devices, device_kind, plan.capacity_bytes)
    raise ConfigError(
        f"the run needs {gigabytes(plan.total_bytes)} per device but each {device_kind} has "
        f"{gigabytes(plan.capacity_bytes)} ({HEADROOM:.0%} usable): activations "
        f"{gigabytes(plan.activation_phase_bytes)} at {plan.micro_batch_per_device} x {plan.segment_len} tokens per "
        f"device and model.remat={plan.remat!r}, parameters, optimizer state and batch "
        f"{gigabytes(plan.state_bytes)}; raise train.grad_accum (now {plan.grad_accum}), mesh.fsdp (more "
        f"devices) or mesh.sequence (now {plan.length_ways}: each sequence over more devices), set "
        "model.remat='full', or lower train.global_batch" + (f": {change}" if change else "") +
        f" (python -m yanjax.main.plan --config <config> --devices {devices} --device_kind '{device_kind}' "
        "shows the plan)")
  return plan


# ---- the compiled step (the local devices) ------------------------------------------------------------


def compiled_memory(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> dict[str, int]:
  """XLA's memory analysis of the trainer's sharded train step on `devices` (default: all), from abstract
  inputs: nothing is allocated. Returns bytes per device: argument, output, alias, temp and
  total = argument + output - alias + temp (the donated state is aliased to the new one)."""
  from yanjax.training.trainer import build_trainer  # pylint: disable=import-outside-toplevel  # compiles: not for check_fits
  trainer = build_trainer(cfg, devices)
  shape = (cfg.train.global_batch, cfg.train.seq_len)
  batch = {name: jax.ShapeDtypeStruct(shape, jnp.float32 if name == "loss_mask" else jnp.int32,
                                      sharding=trainer.batch_sharding)
           for name in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
  step = trainer.train_step
  state = trainer.abstract_state()
  analysis = step.lower(state, batch).compile().memory_analysis()
  if analysis is None:
    raise ConfigError(f"the {jax.default_backend()} backend gives no memory analysis")
  out = {"argument": analysis.argument_size_in_bytes, "output": analysis.output_size_in_bytes,
         "alias": analysis.alias_size_in_bytes, "temp": analysis.temp_size_in_bytes}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out
