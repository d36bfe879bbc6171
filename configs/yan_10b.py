"""Yan 10B, paper table 1: 60 layers, width 3072, 12 channels (Dc 256).

The paper fixes layers, width and channels; vocabulary and FFN width are ours, chosen to give ~10B parameters.

Variants: `configs/yan_10b.py` (dense FFN), `configs/yan_10b.py:selective` (selective activation),
`configs/yan_10b.py:attention` (the parameter-matched attention baseline).
Print every config's size: python -m yanjax.config_table
"""

from yanjax.presets import build_config


def get_config(variant=None):
  return build_config(
      model=dict(
          vocab_size=64000,
          width=3072,
          layers=60,
          channels=12,
          mlp_width=15360,
          dtype='bfloat16',
          scan_layers=True,
          remat='save_dots',
      ),
      variant=variant,
  )
