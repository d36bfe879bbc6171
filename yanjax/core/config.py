"""Model configuration: one frozen dataclass, validated when it is built.

Config files in `configs/` are Python files whose `get_config()` returns an `ml_collections.ConfigDict`;
its `model` entry becomes a `ModelConfig` through `ModelConfig.from_dict`, which names the offending key
for anything unknown or impossible.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
import re
from typing import Any, Sequence

from yanjax.core.errors import UserError
from yanjax.numpy_runtime.mixers import MIXERS, arch_renamed

RECURRENCE_FORMS = ("auto", "reference", "associative", "chunked")
COMBINES = ("concat", "sum")
DISPATCHES = ("capacity", "dropless")
REMATS = ("none", "full", "save_dots")
DTYPES = ("float32", "bfloat16")


class ConfigError(UserError):
  """A config key is unknown or holds an impossible value."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every architectural choice of a Yan (MCSD) or attention-baseline language model.

  Sizes: the legend in docs/model.md names each field's letter (D = `width`, C = `channels`, E = `groups`, ...).
  """

  mixer: str = "mcsd"  # a name in yanjax/numpy_runtime/mixers.py: "mcsd" or "attention" (LLaMA-style baseline)
  vocab_size: int = 512  # V
  width: int = 128  # D
  layers: int = 2  # L
  mlp_width: int = 512  # F: GeGLU hidden width (all groups together)
  # MCSD mixer (mixer="mcsd"), paper section 2.2.
  channels: int = 4  # C; D must divide by it
  combine: str = "concat"  # "concat" + output projection (eq. 13) or "sum" (eq. 20)
  learnable_rates: bool = False  # paper: fixed; True: learnable, initialised at the paper's values
  include_current: bool = False  # paper: strict past; True: history includes the current token
  recurrence: str = "auto"  # "reference" | "associative" | "chunked" | "auto"
  chunk_size: int = 64  # chunk length Lc of the chunked form
  # Attention baseline (mixer="attention").
  heads: int = 4  # H; head width Dh = D / H
  rope_theta: float = 10_000.0
  max_decode_len: int = 2048  # KV-cache slots s for decoding
  # Selective activation over E groups of FFN neurons (router=False: dense FFN).
  router: bool = False
  groups: int = 8  # E
  top_k: int = 2  # k
  router_hidden: int = 64  # R: hidden width of the router MLP
  dispatch: str = "capacity"  # "capacity" (token dropping) or "dropless" (grouped matmul)
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
  def max_context(self) -> int | None:
    """The most tokens one decode cache holds (attention: max_decode_len); None: the mixer's state is fixed."""
    return MIXERS[self.mixer].twin.max_context(self.to_dict())

  @classmethod
  def from_dict(cls, values: Any) -> ModelConfig:
    """Builds a config from a mapping (dict or ConfigDict); unknown keys are an error naming them."""
    values = dict(values)
    if "arch" in values:
      raise ConfigError(arch_renamed(values["arch"], "model."))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(
          f"unknown model config key(s) {unknown}; valid keys are {sorted(known)}")
    return cls(**values)

  def replace(self, **changes) -> ModelConfig:
    return ModelConfig.from_dict({**dataclasses.asdict(self), **changes})

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def _validate(self):
    def fail(key, why):
      raise ConfigError(f"model.{key}={getattr(self, key)!r}: {why}")

    for key, allowed in (("mixer", tuple(MIXERS)), ("recurrence", RECURRENCE_FORMS), ("combine", COMBINES),
                         ("dispatch", DISPATCHES), ("remat", REMATS), ("dtype", DTYPES)):
      if getattr(self, key) not in allowed:
        fail(key, f"must be one of {allowed}")
    for key in ("vocab_size", "width", "layers", "mlp_width", "channels", "heads", "chunk_size",
                "max_decode_len", "groups", "top_k", "router_hidden"):
      if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
        fail(key, "must be a positive integer")
    problem = MIXERS[self.mixer].twin.check(self.to_dict())
    if problem:
      fail(*problem)
    if self.router:
      if self.top_k > self.groups:
        fail("top_k", f"must be <= groups ({self.groups})")
      if self.mlp_width % self.groups:
        fail("groups", f"mlp_width {self.mlp_width} must be divisible by groups")
      if self.capacity_factor <= 0:
        fail("capacity_factor", "must be positive")
      if self.explore_steps < 0:
        fail("explore_steps", "must be >= 0")
    for key in ("norm_eps", "init_std", "rope_theta"):
      if not math.isfinite(getattr(self, key)) or getattr(self, key) <= 0:
        fail(key, "must be a positive finite number")


def load_config_file(spec: str | pathlib.Path):
  """Imports a Python config file and returns its `get_config(variant)` (an ml_collections.ConfigDict).

  `spec` is `path/to/config.py` or `path/to/config.py:variant` (the big_vision / config_flags convention).
  """
  path, _, variant = str(spec).partition(":")
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"yanjax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config()")
  return module.get_config(variant) if variant else module.get_config()


def config_spec(argv: Sequence[str]) -> str:
  """The value of --config in a command line `argv` ('' if absent)."""
  for i, arg in enumerate(argv):
    if re.match(r"^--?config(=|$)", arg):
      return arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
  return ""


def config_flag_error(argv: Sequence[str], error: Exception, default_spec: str = "", hint: str = "") -> str:
  """One line for a bad --config or --config.<key>=<value> (ml_collections' config_flags raise whatever the
  override hit): the config file's own error, the override whose key the config lacks and the keys it has,
  else `error` restated and `hint`."""
  spec = config_spec(argv) or default_spec
  try:
    node = load_config_file(spec)
  except Exception as load_error:  # pylint: disable=broad-except  # the config file's own error
    return f"--config={spec}: {' '.join(str(load_error).split())}"
  for arg in (a for a in argv if a.startswith("--config.")):
    keys = arg[len("--config."):].split("=", 1)[0].split(".")
    at = node
    for depth, key in enumerate(keys):
      if not hasattr(at, "keys") or key not in at.keys():
        section = ".".join(keys[:depth]) or "the config"
        known = ", ".join(sorted(at.keys())) if hasattr(at, "keys") else "none (not a section)"
        return f"{arg}: {section} has no key {key!r}; its keys are {known}"
      at = at[key]
  return f"{type(error).__name__}: {' '.join(str(error).split())}{hint}"
