"""~85M-parameter Yan model (scaling-sweep size).

Variants: `configs/yan_85m.py` (dense FFN), `configs/yan_85m.py:selective` (selective activation),
`configs/yan_85m.py:attention` (the parameter-matched attention baseline).
Print every config's size: python -m yanjax.config_table
"""

from yanjax.presets import build_config


def get_config(variant=None):
  return build_config(
      model=dict(
          vocab_size=32000,
          width=640,
          layers=12,
          channels=10,
          mlp_width=2304,
          dtype='bfloat16',
      ),
      variant=variant,
  )
