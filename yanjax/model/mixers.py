"""The JAX token mixers: one registry line per mixer maps its name (an entry of `model.pattern`) to its module.

A mixer module is built as `cls(cfg, rngs=rngs)`, called as `mixer(x, inputs, cache=None) -> (y, cache)`, has
`init_cache(batch, dtype)`, and gives the plan its activation memory (`residual_terms`, `backward_terms`). What
follows from the config alone (validation, export layout, counts) is its NumPy twin's, registered under the same
name in yanjax/numpy_runtime/mixers.py (tests/test_mixers.py checks that the two registries name the same
mixers).
"""

from __future__ import annotations

from yanjax.model.attention import Attention
from yanjax.model.mcsd import MCSD
from yanjax.model.mcsd_dd import MCSDDataDecay
from yanjax.model.swa import SlidingWindowAttention

MIXERS = {
    "mcsd": MCSD,
    "mcsd_dd": MCSDDataDecay,
    "attention": Attention,
    "swa": SlidingWindowAttention,
}
