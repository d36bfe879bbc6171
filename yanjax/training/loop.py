"""The training loop: runs the jitted train step and calls hooks at intervals, as Levanter's trainer does.

    loop = TrainLoop(trainer, cfg.train)                   # trainer: yanjax/training/trainer.py
    loop.add_hook(logger, every=1)                         # hooks: yanjax/training/hooks.py
    loop.add_hook(evaluate, every=cfg.train.eval_every)
    loop.add_hook(save, every=cfg.checkpoint.every_steps, seconds=60 * cfg.checkpoint.every_minutes, at_stop=True)
    loop.add_hook(logger.close, at_end=True)
    info = loop.run(state, start, batches)                 # info.state, info.step, info.exit_code

A hook is `fn(info: StepInfo)`. After each step is dispatched (its arrays may still be computing), the loop
calls the hooks that are due, in the order they were added:
- `every=N`: at steps divisible by N;
- `seconds=S`: when S seconds passed since the hook last ran; checked every `train.log_every` steps and
  decided by process 0 for every process (a collective), so all hosts run it at the same step;
- both also run at the run's last step (`train.steps`);
- `at_stop=True`: at the step on which an earlier hook set `info.stopping` (the loop ends after that step).
After the loop, the hooks added with `at_end=True` run once with the last step's info (also after a stop).
The step runs under `jax.transfer_guard("disallow")` when `train.transfer_guard` is set; hooks run without.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections

from yanjax.training.hosts import agree
from yanjax.training.trainer import Trainer


@dataclasses.dataclass
class StepInfo:
  """The run after step `step` (steps count from 1: step k made the state `state`)."""
  step: int
  start: int  # the step this run started from: 0, or the step of the checkpoint it resumed
  state: dict  # the train state (yanjax/training/train_step.py)
  metrics: dict  # the step's metrics as jax.Arrays, possibly still computing
  last: bool  # step == train.steps
  exit_code: int = 0  # the run's exit code so far; a hook sets it (e.g. nan_policy="stop")
  stopping: bool = False  # set by a hook: `at_stop` hooks run, then the loop ends after this step


@dataclasses.dataclass
class Hook:
  fn: Callable[[StepInfo], Any]
  every: int
  seconds: float
  at_stop: bool
  at_end: bool
  last_run: float = 0.0  # time.monotonic() of the last run (or of the loop's start)

  def due(self, info: StepInfo, at_sync: bool) -> bool:
    if (self.every or self.seconds) and info.last:
      return True
    if self.every and info.step % self.every == 0:
      return True
    if self.at_stop and info.stopping:
      return True
    return bool(self.seconds) and at_sync and agree(time.monotonic() - self.last_run > self.seconds)


class TrainLoop:
  """Runs `trainer.train_step` from a state to `train.steps` on batches, calling hooks (module docstring)."""

  def __init__(self, trainer: Trainer, train_cfg: ml_collections.ConfigDict):
    self.trainer = trainer
    self.steps = train_cfg.steps
    self.sync_every = train_cfg.log_every
    self.transfer_guard = train_cfg.transfer_guard
    self.hooks: list[Hook] = []

  def add_hook(self, fn: Callable[[StepInfo], Any], every: int = 0, seconds: float = 0.0, at_stop: bool = False,
               at_end: bool = False):
    """Calls `fn(info)` at the steps `every`, `seconds`, `at_stop` select, and after the loop if `at_end`."""
    if not (every or seconds or at_stop or at_end):
      raise ValueError(f"hook {fn} has no interval: give every=, seconds=, at_stop= or at_end=")
    self.hooks.append(Hook(fn, every, seconds, at_stop, at_end))

  def run(self, state: dict, start: int, batches: Iterator[dict]) -> StepInfo:
    """Trains from `state` (made by step `start`) on `batches` (this process's rows of each step, in order)
    until `train.steps` or a hook stops the run; returns the last step's info."""
    info = StepInfo(step=start, start=start, state=state, metrics={}, last=start >= self.steps)
    for hook in self.hooks:
      hook.last_run = time.monotonic()
    with jax.transfer_guard("disallow" if self.transfer_guard else "allow"):
      while info.step < self.steps and not info.stopping:
        with jax.transfer_guard("allow"):
          batch = self.trainer.to_global(next(batches))
        state, metrics = self.trainer.train_step(info.state, batch)
        step = info.step + 1
        info = StepInfo(step, start, state, metrics, last=step == self.steps, exit_code=info.exit_code)
        at_sync = step % self.sync_every == 0 or info.last
        with jax.transfer_guard("allow"):
          for hook in self.hooks:
            if hook.due(info, at_sync):
              hook.fn(info)
              hook.last_run = time.monotonic()
    with jax.transfer_guard("allow"):
      for hook in self.hooks:
        if hook.at_end:
          hook.fn(info)
    return info
