"""~20M-parameter Yan model (scaling-sweep size).

Run (a token store you prepared: see docs/data.md; the plan first):

    python -m data_pipelines.prepare --output gs://BUCKET/stores/web --vocab_size 32000 'shards/*.jsonl.gz'
    python -m yanjax.main.plan --config configs/yan_20m.py --devices 8 --device_kind "H100 80GB"
    python -m yanjax.main.train --config configs/yan_20m.py --workdir gs://BUCKET/runs/yan_20m \
        --config.data.stores="('gs://BUCKET/stores/web',)"

Training: about 20 tokens per parameter (400,000,000 tokens), 2048-token sequences x 256
(524,288 tokens per step), AdamW with warmup and cosine decay.

Variants: `configs/yan_20m.py` (dense FFN), `configs/yan_20m.py:selective` (selective activation),
`configs/yan_20m.py:mcsd_dd` (MCSD with data-dependent decay), `configs/yan_20m.py:attention` (the parameter-matched
attention baseline), `configs/yan_20m.py:hybrid` (sliding-window attention and MCSD
layers alternating, attention first, window 1024, FFN width matched).
Print every config's size: python -m yanjax.main.config_table
"""

from yanjax.training.presets import build_config


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
      train=dict(steps=0, tokens=400_000_000, global_batch=256, seq_len=2048, eval_every=500),
      optimizer=dict(lr=3e-3, warmup_steps=100),
      data=dict(stores=("data/web",)),
      mesh=dict(data=-1, fsdp=1, tensor=1, expert=1),
      checkpoint=dict(every_steps=200, every_minutes=30.0),
  )
