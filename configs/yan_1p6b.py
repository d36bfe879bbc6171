"""Yan 1.6B, paper table 1: 12 layers, width 2560, 10 channels (Dc 256).

The paper fixes layers, width and channels; vocabulary and FFN width are ours, chosen to give ~1.6B parameters.

Run from zero (launch/README.md walks through it): prepare the corpus into a bucket, check the plan,
submit on Slurm (or the TPU / Kubernetes recipes in launch/):

    python -m data_pipelines.prepare --output gs://BUCKET/stores/web --vocab_size 64000 'shards/*.jsonl.gz'
    python -m yanjax.main.plan --config configs/yan_1p6b.py --devices 256 --device_kind "H100 80GB"
    sbatch --nodes=32 launch/slurm.sbatch configs/yan_1p6b.py gs://BUCKET/runs/yan_1p6b \
        --config.data.stores="('gs://BUCKET/stores/web',)"

Training as the paper: AdamW, peak lr 8e-4, 4096-token sequences x 1152 (4.7M tokens per step), warmup and
cosine decay; 32B tokens (about 20 per parameter; the paper does not state its budget). FSDP
over all devices with tensor=2 (so that the batch of 1152 divides over the batch-parallel devices at 8, 64
and 256 GPUs); bfloat16 compute, float32 parameters, remat save_dots.

Variants: `configs/yan_1p6b.py` (dense FFN), `configs/yan_1p6b.py:selective` (selective activation),
`configs/yan_1p6b.py:mcsd_dd` (MCSD with data-dependent decay), `configs/yan_1p6b.py:attention` (the parameter-matched
attention baseline), `configs/yan_1p6b.py:hybrid` (sliding-window attention and MCSD
layers alternating, attention first, window 1024, FFN width matched), `configs/yan_1p6b.py:long` (the Yan model on
1M-token sequences, 4 per step, each split over the devices: mesh.sequence; docs/sequence_parallel.md):

    python -m yanjax.main.plan --config configs/yan_1p6b.py:long --devices 128 --device_kind "H100 80GB"

Print every config's size: python -m yanjax.main.config_table
"""

from yanjax.training.presets import build_config


def get_config(variant=None):
  return build_config(
      model=dict(
          vocab_size=64000,
          width=2560,
          layers=12,
          channels=10,
          mlp_width=13568,
          dtype='bfloat16',
          scan_layers=True,
          remat='save_dots',
          max_decode_len=4096,
      ),
      variant=variant,
      train=dict(steps=0, tokens=32_000_000_000, global_batch=1152, seq_len=4096, eval_every=500),
      optimizer=dict(lr=8e-4, warmup_steps=2000),
      data=dict(stores=("data/web",)),
      mesh=dict(data=1, fsdp=-1, tensor=2, expert=1),
      checkpoint=dict(every_steps=500, every_minutes=30.0),
  )
