"""JAX's persistent compilation cache under the run's work directory (local or bucket), with hit counts.

A requeued or resumed job compiles the same programs again; with the cache it loads them instead. JAX keys
entries by the program, the devices and the compiler version, so a job on another topology simply misses.
"""

from __future__ import annotations

import collections
from typing import Callable

import jax

_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_counts: collections.Counter = collections.Counter()


def _count(event: str, **_kwargs) -> None:
  if event in _EVENTS:
    _counts[_EVENTS[event]] += 1


def enable(directory: str) -> None:
  """Caches compiled programs in `directory` (a local path or gs:// / s3:// URL) and counts hits."""
  jax.config.update("jax_compilation_cache_dir", directory)
  if not _counts.get("enabled"):
    jax.monitoring.register_event_listener(_count)
    _counts["enabled"] = 1


def counts() -> dict[str, int]:
  """{"hits": n, "misses": n} of the persistent cache since `enable` (programs below JAX's minimum compile
  time, jax_persistent_cache_min_compile_time_secs, are neither)."""
  return {"hits": _counts["hits"], "misses": _counts["misses"]}


def report(say: Callable[[str], None]) -> None:
  """Logs the hit count, so a requeued job shows whether it recompiled."""
  directory = jax.config.jax_compilation_cache_dir
  if directory:
    c = counts()
    say(f"compilation cache {directory}: {c['hits']} hits, {c['misses']} misses")
