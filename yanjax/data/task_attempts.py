"""Counting the tries of each task of a Ray Data map, so that a task whose worker dies every time ends the map.

Ray runs a task again, without limit, when its worker dies (killed for memory, a crash in native code); Ray
2.60 has no bound on that which is not deprecated (`max_retries` travels only in the deprecated
`**ray_remote_args` of `Dataset.map`). So each try first asks one small actor which try of its item it is:
a try past the last allowed one does not run the item again but reports that the workers of every earlier
try died.
"""

from __future__ import annotations

import collections
from typing import Any


class Attempts:
  """The tries started of each item, by its index in the map."""

  def __init__(self):
    self.started: collections.Counter[int] = collections.Counter()

  def start(self, index: int) -> int:
    """Counts a try of item `index`; returns which one it is, from 1."""
    self.started[index] += 1
    return self.started[index]


def start_actor() -> Any:
  """A new `Attempts` actor in the connected Ray cluster; it takes no CPU from the tasks it counts."""
  import ray  # pylint: disable=import-outside-toplevel  # Ray is slow to import; only preparation needs it
  return ray.remote(num_cpus=0, max_restarts=0)(Attempts).remote()
