"""A CPU-sized sweep on the default corpus: 3 tiny sizes x 2 token budgets, MCSD and its attention baseline.

Run: python -m yanjax.main.sweep run --spec configs/sweeps/tiny.py --out runs/sweep_tiny
     python -m yanjax.main.sweep fit --out runs/sweep_tiny
"""


def get_sweep():
  return dict(
      families={"yan": "configs/yan_tiny.py", "attention": "configs/yan_tiny.py:attention"},
      sizes={
          "w32": dict(width=32, channels=2, mlp_width=96, layers=1),
          "w48": dict(width=48, channels=3, mlp_width=144, layers=2),
          "w64": dict(width=64, channels=4, mlp_width=192, layers=2),
      },
      tokens=[16_384, 49_152],
      config=dict(train=dict(global_batch=8, seq_len=64, log_every=10, eval_batches=2),
                  optimizer=dict(warmup_steps=10)),
  )
