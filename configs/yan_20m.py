"""~20M-parameter Yan model (scaling-sweep size).

Variants: `configs/yan_20m.py` (dense FFN), `configs/yan_20m.py:selective` (selective activation),
`configs/yan_20m.py:attention` (the parameter-matched attention baseline).
Print every config's size: python -m yanjax.config_table
"""

from yanjax.presets import build_config


def get_config(variant=None):
  return build_config(
      model=dict(
          vocab_size=32000,
          width=320,
          layers=6,
          channels=5,
          mlp_width=1280,
          dtype='bfloat16',
      ),
      variant=variant,
  )
