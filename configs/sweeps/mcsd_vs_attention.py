"""MCSD vs its parameter-matched attention baseline on IsoFLOP budgets, at the ~20M / 85M / 350M sweep sizes.

For a GPU/TPU cluster: python -m yanjax.main.sweep launch --spec configs/sweeps/mcsd_vs_attention.py --out gs://.../sweep
then `sbatch <out>/sweep.sbatch`, and `python -m yanjax.main.sweep fit --out <out>` when the points are done.
The token store must be prepared with the models' vocabulary (32000): see docs/data.md.
"""


def get_sweep():
  return dict(
      families={"yan": "configs/yan_85m.py", "attention": "configs/yan_85m.py:attention"},
      sizes={
          "20m": dict(width=320, layers=6, channels=5, mlp_width=1280),
          "85m": dict(width=640, layers=12, channels=10, mlp_width=2304),
          "350m": dict(width=1024, layers=24, channels=8, mlp_width=3328),
      },
      isoflop=[3e17, 1e18, 3e18],
      config=dict(train=dict(global_batch=256, seq_len=2048, eval_every=1000, eval_batches=20),
                  optimizer=dict(lr=1e-3, warmup_steps=500),
                  data=dict(stores=("data/web",), prepare_default=False)),
  )
