"""Optimizer: AdamW with warmup + cosine or warmup-stable-decay, global-norm clipping, decay on matrices only."""

from __future__ import annotations

import optax
from flax import nnx


def learning_rate_schedule(opt_cfg, steps: int) -> optax.Schedule:
  """Warmup from 0 to `lr`, then cosine to `lr * min_lr_ratio` ("cosine"), or hold `lr` and decay linearly to
  `lr * min_lr_ratio` over the last `decay_fraction` of the steps ("wsd", warmup-stable-decay)."""
  peak, floor, warmup = opt_cfg.lr, opt_cfg.lr * opt_cfg.min_lr_ratio, opt_cfg.warmup_steps
  if opt_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), floor)
  decay = max(1, int(round(steps * opt_cfg.decay_fraction)))
  stable = max(0, steps - warmup - decay)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak),
       optax.linear_schedule(peak, floor, decay)],
      boundaries=[warmup, warmup + stable])


def decay_mask(state: nnx.State) -> dict:
  """Pure-dict mask: weight decay on projection matrices and embeddings; none on norm scales (any shape),
  rates or other vectors. Judged by logical axes, not ndim, so stacked [layers, ...] parameters keep their rule.
  """
  def decays(path, var):
    axes = var.get_metadata().get("out_sharding") or (None,) * var.ndim
    return path[-1] != "scale" and sum(axis != "layers" for axis in axes) >= 2

  flat = [(path, var.replace(decays(path, var))) for path, var in nnx.to_flat_state(state)]
  return nnx.to_pure_dict(nnx.from_flat_state(flat))


def make_optimizer(opt_cfg, steps: int, mask: dict) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(opt_cfg.clip_norm),
      optax.adamw(learning_rate_schedule(opt_cfg, steps), b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                  weight_decay=opt_cfg.weight_decay, mask=mask),
  )
