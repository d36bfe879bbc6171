"""~350M-parameter Yan model (scaling-sweep size).

Variants: `configs/yan_350m.py` (dense FFN), `configs/yan_350m.py:selective` (selective activation),
`configs/yan_350m.py:attention` (the parameter-matched attention baseline).
Print every config's size: python -m yanjax.config_table
"""

from yanjax.presets import build_config


def get_config(variant=None):
  return build_config(
      model=dict(
          vocab_size=32000,
          width=1024,
          layers=24,
          channels=8,
          mlp_width=3328,
          dtype='bfloat16',
      ),
      variant=variant,
  )
