"""The token mixers: one registry line per mixer maps its name (`model.mixer`) to everything about it.

An entry names two classes:
  model  the JAX module (yanjax/model/<file>.py) as "module:Class" text, imported on first use by the JAX side
         (`model_class`): this package imports NumPy and the standard library only. It is called as
         `mixer(x, inputs, cache=None) -> (y, cache)`, has `init_cache(batch, dtype)`, and gives the plan its
         activation memory (`residual_terms`, `backward_terms`).
  twin   its NumPy twin (numpy_runtime/<file>.py): the runtime that runs an export, called the same way
         (`twin(x, inputs, state=None) -> (y, state)`, `init_state(batch, max_len)`), and, as static methods,
         what follows from the config alone: `check` (validation), `shapes` (export layout), `params` and
         `mixing_flops` (yanjax.model.counting), `max_context` (the decode cache's bound), `summary`.

Adding a mixer is those two files and one line in MIXERS (docs/model.md, "Adding a mixer").
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

from .attention import Attention
from .mcsd import MCSD
from .mcsd_dd import MCSDDataDecay
from .swa import SlidingWindowAttention


class Mixer(NamedTuple):
  model: str  # "module:Class" of the JAX nnx.Module
  twin: type  # the NumPy class


MIXERS = {
    "mcsd": Mixer("yanjax.model.mcsd:MCSD", MCSD),
    "mcsd_dd": Mixer("yanjax.model.mcsd_dd:MCSDDataDecay", MCSDDataDecay),
    "attention": Mixer("yanjax.model.attention:Attention", Attention),
    "swa": Mixer("yanjax.model.swa:SlidingWindowAttention", SlidingWindowAttention),
}
ARCH_VALUES = {"yan": "mcsd", "attention": "attention"}  # the mixer's config key was `arch` (export format 1)


def model_class(name: str) -> type:
  """The JAX module class of mixer `name` (imports JAX)."""
  module, _, cls = MIXERS[name].model.partition(":")
  return getattr(importlib.import_module(module), cls)


def arch_renamed(arch: Any, section: str = "") -> str:
  """The one-line error for a config that still has `arch`; `section` prefixes the keys (e.g. "model.")."""
  mixer = ARCH_VALUES.get(arch) if isinstance(arch, str) else None
  use = f"{section}mixer={mixer!r}" if mixer else f"{section}mixer, one of {tuple(MIXERS)}"
  return f"{section}arch was renamed: use {use} (was arch={arch!r})"
