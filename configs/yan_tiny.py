"""Tiny Yan model for CPU smoke runs (seconds per step on a laptop).

Variants: `configs/yan_tiny.py` (dense FFN), `configs/yan_tiny.py:selective` (selective activation),
`configs/yan_tiny.py:attention` (the parameter-matched attention baseline).
Print every config's size: python -m yanjax.config_table
"""

from yanjax.presets import build_config


def get_config(variant=None):
  return build_config(
      model=dict(
          vocab_size=2048,
          width=128,
          layers=2,
          channels=4,
          mlp_width=384,
      ),
      variant=variant,
  )
