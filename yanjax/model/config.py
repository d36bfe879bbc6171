"""The model's configuration: one frozen dataclass, validated when it is built.

The allowed value of each choice comes from the code that implements it: mixers from the NumPy runtime's
registry (yanjax/numpy_runtime/mixers.py, which yanjax/model/mixers.py mirrors for JAX), recurrence forms from
yanjax/model/recurrence.py, dispatches and grouped matmuls from yanjax/model/dispatch.py, remat policies and
compute dtypes from yanjax/model/layers.py, MCSD's combine modes from its NumPy twin.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from yanjax.core.config import ConfigError
from yanjax.model.attention_kernel import KERNELS, config_problem
from yanjax.model.dispatch import DISPATCHES, GROUPED_MATMULS, KERNELS_INSTALL, tokamax_installed
from yanjax.model.layers import COMPUTE_DTYPES, REMAT_POLICIES
from yanjax.model.recurrence import FORMS
from yanjax.numpy_runtime.mcsd import COMBINES
from yanjax.numpy_runtime.mixers import TWINS, layer_mixers, max_context, renamed_key_error

RECURRENCE_FORMS = ("auto", *FORMS)
# Choices of how layers are computed, not of what they compute: a trained model gives the same results under any
# value, so a saved run's model read on another machine (`ModelConfig.saved`) takes "auto" for each.
KERNEL_KEYS = ("recurrence", "attention_kernel", "grouped_matmul")
REMATS = ("none", *REMAT_POLICIES)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every architectural choice of a Yan (MCSD) or attention-baseline language model.

  Sizes: the legend in docs/model.md names each field's letter (D = `width`, C = `channels`, E = `groups`, ...).
  """

  # The mixer of every layer, as a pattern repeated L / len(pattern) times: names in yanjax/numpy_runtime/mixers.py
  # ("mcsd", "mcsd_dd", "attention", "swa"); a uniform model is a pattern of one, a hybrid e.g. ("mcsd", "mcsd", "swa").
  pattern: tuple[str, ...] = ("mcsd",)
  vocab_size: int = 512  # V
  width: int = 128  # D
  layers: int = 2  # L
  mlp_width: int = 512  # F: GeGLU hidden width (all groups together)
  # MCSD mixer ("mcsd", and "mcsd_dd": data-dependent decay), paper section 2.2.
  channels: int = 4  # C; D must divide by it
  combine: str = "concat"  # "concat" + output projection (eq. 13) or "sum" (eq. 20)
  learnable_rates: bool = False  # paper: fixed; True: learnable, initialised at the paper's values
  include_current: bool = False  # paper: strict past; True: history includes the current token
  recurrence: str = "auto"  # "reference" | "associative" | "chunked" | "pallas" | "auto"
  chunk_size: int = 64  # chunk length Lc of the chunked and pallas forms
  # Attention ("attention": the baseline; "swa": sliding-window).
  heads: int = 4  # H; head width Dh = D / H
  rope_theta: float = 10_000.0
  max_decode_len: int = 2048  # KV-cache slots s for decoding
  # The implementation of a training pass of "attention" and "swa": "auto" (cuDNN flash attention on NVIDIA GPUs
  # in bfloat16, else XLA) | "xla" | "cudnn" (an error where it cannot run); yanjax/model/attention_kernel.py.
  attention_kernel: str = "auto"
  # Sliding-window attention ("swa"): each query sees the W latest tokens of its document, itself included.
  window: int = 256  # W; also its decode cache's ring-buffer slots
  # Selective activation over E groups of FFN neurons (router=False: dense FFN).
  router: bool = False
  groups: int = 8  # E
  top_k: int = 2  # k
  router_hidden: int = 64  # R: hidden width of the router MLP
  dispatch: str = "capacity"  # "capacity" (token dropping) or "dropless" (grouped matmul)
  grouped_matmul: str = "auto"  # dropless's: "xla" (jax.lax.ragged_dot), "tokamax" (its kernels), "auto" (per backend)
  capacity_factor: float = 1.25
  explore_steps: int = 1000  # steps over which random group choice anneals to learned choice
  lb_loss_weight: float = 0.01  # Switch load-balancing loss weight
  router_z_loss_weight: float = 1e-3
  # Whole model.
  tie_embeddings: bool = True
  scan_layers: bool = False
  remat: str = "none"  # "none" | "full" | "save_dots"
  dtype: str = "float32"  # compute dtype; parameters are always float32
  norm_eps: float = 1e-6
  init_std: float = 0.02

  def __post_init__(self):
    self._validate()

  @property
  def channel_width(self) -> int:
    """Dc = D / C."""
    return self.width // self.channels

  @property
  def head_dim(self) -> int:
    """Dh = D / H."""
    return self.width // self.heads

  @property
  def group_width(self) -> int:
    """g = F / E neurons per FFN group (F when router=False)."""
    return self.mlp_width // self.groups if self.router else self.mlp_width

  @property
  def layer_mixers(self) -> tuple[str, ...]:
    """The mixer of each of the L layers: the pattern repeated."""
    return layer_mixers(self.pattern, self.layers)

  @property
  def pattern_name(self) -> str:
    """The pattern as one word for tables and logs: "mcsd", "mcsd+mcsd+swa"."""
    return "+".join(self.pattern)

  @property
  def max_context(self) -> int | None:
    """The most tokens one decode cache holds (attention: max_decode_len); None: every layer's state is bounded
    (MCSD's is fixed, sliding-window attention's a ring of W slots)."""
    return max_context(self.to_dict())

  @classmethod
  def from_dict(cls, values: Any) -> ModelConfig:
    """Builds a config from a mapping (dict or ConfigDict); unknown keys are an error naming them."""
    values = dict(values)
    for old in ("arch", "mixer"):
      if old in values:
        raise ConfigError(renamed_key_error(old, values[old], "model."))
    if isinstance(values.get("pattern"), list):
      values["pattern"] = tuple(values["pattern"])
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(
          f"unknown model config key(s) {unknown}; valid keys are {sorted(known)}")
    return cls(**values)

  @classmethod
  def saved(cls, values: Any) -> ModelConfig:
    """A saved run's model config for use on this machine: `from_dict` with the KERNEL_KEYS at "auto" (a run's
    "cudnn" or "tokamax" may not run here)."""
    return cls.from_dict({**dict(values), **{key: "auto" for key in KERNEL_KEYS}})

  def replace(self, **changes) -> ModelConfig:
    return ModelConfig.from_dict({**dataclasses.asdict(self), **changes})

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def _validate(self):
    def fail(key, why):
      raise ConfigError(f"model.{key}={getattr(self, key)!r}: {why}")

    if not (isinstance(self.pattern, tuple) and self.pattern and all(isinstance(n, str) for n in self.pattern)):
      fail("pattern", "must be a non-empty tuple of mixer names, e.g. ('mcsd',) or ('mcsd', 'mcsd', 'swa')")
    unknown = [name for name in self.pattern if name not in TWINS]
    if unknown:
      fail("pattern", f"names unknown mixer(s) {unknown}; each must be one of {tuple(TWINS)}")
    for key, allowed in (("recurrence", RECURRENCE_FORMS), ("combine", COMBINES),
                         ("dispatch", tuple(DISPATCHES)), ("grouped_matmul", GROUPED_MATMULS), ("remat", REMATS),
                         ("dtype", COMPUTE_DTYPES), ("attention_kernel", KERNELS)):
      if getattr(self, key) not in allowed:
        fail(key, f"must be one of {allowed}")
    for key in ("vocab_size", "width", "layers", "mlp_width", "channels", "heads", "chunk_size",
                "max_decode_len", "window", "groups", "top_k", "router_hidden"):
      if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
        fail(key, "must be a positive integer")
    if self.layers % len(self.pattern):
      fail("pattern", f"its length {len(self.pattern)} must divide model.layers={self.layers}")
    for name in dict.fromkeys(self.pattern):
      problem = TWINS[name].check(self.to_dict())
      if problem:
        fail(*problem)
    if self.attention_kernel == "cudnn" and (why := config_problem(self.dtype, self.head_dim)):
      fail("attention_kernel", f"{why}; use 'auto' (cuDNN where it can run, XLA elsewhere) or 'xla'")
    if self.router:
      if self.top_k > self.groups:
        fail("top_k", f"must be <= groups ({self.groups})")
      if self.mlp_width % self.groups:
        fail("groups", f"mlp_width {self.mlp_width} must be divisible by groups")
      if self.capacity_factor <= 0:
        fail("capacity_factor", "must be positive")
      if self.explore_steps < 0:
        fail("explore_steps", "must be >= 0")
      if self.dispatch == "dropless" and self.grouped_matmul == "tokamax" and not tokamax_installed():
        fail("grouped_matmul", f"tokamax is not installed; install it with `{KERNELS_INSTALL}`, or use 'auto' or 'xla'")
    for key in ("norm_eps", "init_std", "rope_theta"):
      if not math.isfinite(getattr(self, key)) or getattr(self, key) <= 0:
        fail(key, "must be a positive finite number")
