"""A child process that must not outlive the process that started it (a sweep's trainer).

The parent starts the child with `child_environment()`; the child calls `die_with_parent()` first thing, which
asks the kernel (Linux's PR_SET_PDEATHSIG) to SIGKILL it the moment its parent dies, however the parent dies.
A SIGKILLed sweep can run no handler to stop its trainer; without this the trainer trained on, holding its
point's lease, and the sweep's re-run failed on that lease. Killed with its parent, the trainer leaves a lease
whose process is gone, which the re-run takes over at once, and resumes from the last checkpoint. SIGTERM and
SIGINT to the parent are still passed on (yanjax.scaling.sweep.StopRequest), so the trainer saves first.
Elsewhere than Linux this is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_ENV = "YANJAX_DIE_WITH_PARENT"  # the parent's pid, for the child to check
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def child_environment() -> dict[str, str]:
  """This process's environment, plus the variable that binds a child started with it to this process."""
  return {**os.environ, PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
  """When the parent asked (PARENT_ENV), this process is killed when the parent dies, or now if it already has.

  The variable is taken out of the environment, so this process's own children are not bound to it."""
  parent = os.environ.pop(PARENT_ENV, None)
  if parent is None or not sys.platform.startswith("linux"):
    return
  libc = ctypes.CDLL(None, use_errno=True)
  if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
  if os.getppid() != int(parent):  # the parent died before the request: nobody would kill us later
    os.kill(os.getpid(), signal.SIGKILL)
