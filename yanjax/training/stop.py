"""Stopping a run at a step boundary: SIGTERM / SIGINT, JAX's preemption notice on multi-host runs, or a
non-finite step under nan_policy="stop"; `stop_check` is the loop's hook that decides."""

from __future__ import annotations

import signal
import sys
from typing import Callable, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from yanjax.core.cli import PREEMPTED_EXIT_CODE
from yanjax.training.hooks import NONFINITE_EXIT_CODE
from yanjax.training.hosts import say
from yanjax.training.loop import StepInfo


class StopRequest:
  """Set by SIGTERM / SIGINT, or JAX's preemption notice; the loop saves and exits at the next step boundary.

  On a multi-process run with JAX's preemption service (on by default), JAX owns SIGTERM: its notifier
  tells every host, and `multihost_utils.reached_preemption_sync_point` names one step at which all of them
  save. The service's other notifiers (where the platform has them) reach the same sync point.
  """

  def __init__(self, early_signals: Sequence[int] = ()):
    """Installed first thing, so a signal during start-up is not lost (see `exit_if_requested`);
    `early_signals`: those caught before this object existed (while the trainer's imports loaded)."""
    self.signal = early_signals[0] if early_signals else None
    self.preemption_service = False
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)

  def join_cluster(self):
    """After `jax.distributed.initialize`: with JAX's preemption service, its notifier now owns SIGTERM."""
    self.preemption_service = (jax.process_count() > 1 and
                               jax._src.distributed.global_state.preemption_sync_manager is not None)  # pylint: disable=protected-access

  def exit_if_requested(self, where: str):
    """Before the first step there is nothing to save: exit at once with the requeue code."""
    if self.signal is not None:
      say(f"stopped by {signal.Signals(self.signal).name} {where}: nothing to save yet")
      sys.exit(PREEMPTED_EXIT_CODE)

  def preempted(self, step: int) -> bool:
    """True on every process at the step JAX's preemption service chose (call it at every step)."""
    return self.preemption_service and multihost_utils.reached_preemption_sync_point(step)

  def _handle(self, signum, _frame):
    self.signal = signum
    logging.warning("received %s: saving at the next step boundary", signal.Signals(signum).name)

  def agreed(self) -> bool:
    """True on every process if any process was signalled (a collective: call at the same steps everywhere)."""
    local = self.signal is not None
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.array(local))))


def stop_check(stop: StopRequest, log_every: int) -> Callable[[StepInfo], None]:
  """A hook for every step: stops the run after a step that set NONFINITE_EXIT_CODE, at the step JAX's
  preemption service chose, or on a signal (agreed between processes at log steps; at every step on one
  process), with the requeue code unless a hook set another."""

  def check(info: StepInfo):
    at_log = info.step % log_every == 0 or info.last
    info.stopping = (info.exit_code == NONFINITE_EXIT_CODE or stop.preempted(info.step) or
                     ((at_log or jax.process_count() == 1) and stop.agreed()))
    if info.stopping:
      info.exit_code = info.exit_code or PREEMPTED_EXIT_CODE

  return check
