"""A two-family IsoFLOP sweep that runs on a 2-core CPU in under about an hour: MCSD and its attention baseline.

Four sizes (36k-418k parameters, the embedding included) at three FLOP budgets each, 12 points per family: enough
for approach 3 (5 parameters) and approach 2 (three sizes per budget, the smallest added because at these budgets
the optimum lies near 80k parameters). The points train on the default corpus (the Python standard library,
prepared into each point's workdir), 2048 tokens a step; the smallest model at the largest budget sees it ~2 times.

Run: python -m yanjax.main.sweep run --spec configs/sweeps/cpu_frontier.py --out runs/sweep_cpu_frontier
     python -m yanjax.main.sweep fit --out runs/sweep_cpu_frontier
What a fit at this scale can and cannot say: docs/results.md.
"""


def get_sweep():
  return dict(
      families={"yan": "configs/yan_tiny.py", "attention": "configs/yan_tiny.py:attention"},
      sizes={
          "w16": dict(width=16, channels=2, mlp_width=48, layers=1),
          "w32": dict(width=32, channels=2, mlp_width=96, layers=1),
          "w64": dict(width=64, channels=4, mlp_width=192, layers=2),
          "w96": dict(width=96, channels=4, mlp_width=288, layers=2),
      },
      isoflop=[3e11, 1e12, 2e12],
      config=dict(train=dict(global_batch=16, seq_len=128, log_every=50, eval_every=500, eval_batches=8,
                             sample_tokens=0),
                  optimizer=dict(warmup_steps=10),
                  checkpoint=dict(every_steps=1000)),
  )
