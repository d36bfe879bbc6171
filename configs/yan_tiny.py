"""Tiny Yan model for CPU smoke runs (seconds per step on a laptop).

Run (README command 1; the only config that prepares its own data, the Python standard library, into
<workdir>/data/stdlib, and the only one with a default --workdir):

    python -m yanjax.main.train --config configs/yan_tiny.py            # --workdir runs/yan_tiny

Variants: `configs/yan_tiny.py` (dense FFN), `configs/yan_tiny.py:selective` (selective activation),
`configs/yan_tiny.py:mcsd_dd` (MCSD with data-dependent decay), `configs/yan_tiny.py:attention` (the parameter-matched
attention baseline), `configs/yan_tiny.py:hybrid` (sliding-window attention and MCSD
layers alternating, attention first, window 128 (= train.seq_len), FFN width matched).
Print every config's size: python -m yanjax.main.config_table
"""

from yanjax.training.presets import build_config


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
      train=dict(steps=500, global_batch=16, seq_len=128, default_workdir="runs/yan_tiny"),
      optimizer=dict(lr=3e-3, warmup_steps=50),
      data=dict(stores=("{workdir}/data/stdlib",), prepare_default=True),
      mesh=dict(data=-1, fsdp=1, tensor=1, expert=1),
      checkpoint=dict(every_steps=100),
  )
