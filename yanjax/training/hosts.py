"""Multi-host helpers of the trainer: which process speaks, and one decision taken by every process."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def process_zero() -> bool:
  return jax.process_index() == 0


def say(message: str):
  """Prints on process 0 without breaking the progress bar."""
  if process_zero():
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    tqdm.write(message)


def agree(local: bool) -> bool:
  """Process 0's decision, on every process (a collective: call it at the same point everywhere)."""
  if jax.process_count() == 1:
    return local
  return bool(multihost_utils.broadcast_one_to_all(np.array(local)))
