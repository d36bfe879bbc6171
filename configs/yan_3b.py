"""Yan 3B, paper table 1: 20 layers, width 2560, 10 channels (Dc 256).

The paper fixes layers, width and channels; vocabulary and FFN width are ours, chosen to give ~3B parameters.

Variants: `configs/yan_3b.py` (dense FFN), `configs/yan_3b.py:selective` (selective activation),
`configs/yan_3b.py:attention` (the parameter-matched attention baseline).
Print every config's size: python -m yanjax.config_table
"""

from yanjax.presets import build_config


def get_config(variant=None):
  return build_config(
      model=dict(
          vocab_size=64000,
          width=2560,
          layers=20,
          channels=10,
          mlp_width=16640,
          dtype='bfloat16',
          scan_layers=True,
          remat='save_dots',
      ),
      variant=variant,
  )
