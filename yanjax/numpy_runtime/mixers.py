"""The NumPy runtime's token mixers: one registry line per mixer maps its name (an entry of `model.pattern`) to
its NumPy twin (numpy_runtime/<file>.py).

A twin runs an export's layer (`twin(c, w)(x, inputs, state=None) -> (y, state)`, `init_state(batch, max_len)`)
and knows, as static methods, what follows from the config alone: `check` (validation), `shapes` (export
layout), `params` and `mixing_flops` (yanjax.model.counting), `max_context` (the decode cache's bound),
`summary`. The JAX modules are registered beside their model code, in yanjax/model/mixers.py: this package
imports NumPy and the standard library only.

Adding a mixer is two files (the JAX module and its twin) and a line in each registry (docs/model.md, "Adding a
mixer").
"""

from __future__ import annotations

from typing import Any

from .attention import Attention
from .mcsd import MCSD
from .mcsd_dd import MCSDDataDecay
from .swa import SlidingWindowAttention

TWINS = {
    "mcsd": MCSD,
    "mcsd_dd": MCSDDataDecay,
    "attention": Attention,
    "swa": SlidingWindowAttention,
}
ARCH_VALUES = {"yan": "mcsd", "attention": "attention"}  # the mixer's config key was `arch` (export format 1)


def layer_mixers(pattern, layers: int) -> tuple[str, ...]:
  """The mixer of each of `layers` layers: `pattern` (a sequence of names) repeated; layer i has pattern[i % P]."""
  return tuple(pattern[i % len(pattern)] for i in range(layers))


def max_context(c: dict[str, Any]) -> int | None:
  """The most tokens a decode cache of the model with config `c` holds: the least of its mixers' bounds (attention:
  max_decode_len); None when every mixer's state is bounded whatever the context (MCSD, sliding-window)."""
  bounds = [TWINS[name].max_context(c) for name in dict.fromkeys(c["pattern"])]
  return min((b for b in bounds if b is not None), default=None)


def renamed_key_error(key: str, value: Any, section: str = "") -> str:
  """The one-line error for a config that still names its mixer by `key` ("arch" until export format 1, "mixer"
  until format 2); `section` prefixes the keys (e.g. "model.")."""
  mixer = ARCH_VALUES.get(value) if key == "arch" and isinstance(value, str) else value
  use = (f"{section}pattern=({mixer!r},)" if mixer in TWINS
         else f"{section}pattern, a tuple of names from {tuple(TWINS)}")
  return f"{section}{key} was renamed: use {use} (a uniform model is a pattern of one; was {key}={value!r})"
