"""Checkpoints with orbax `CheckpointManager`: train state + metadata (step, data position, resolved config).

Layout: <workdir>/checkpoints/<step>/{state, meta}. The workdir may be local or a bucket (gs://, s3://). On
local disk orbax writes each step into a temporary directory and renames it when complete; on object stores,
which cannot rename, it writes in place and commits with a `commit_success.txt` written last. Either way a
save cut short (SIGKILL, preemption) is never listed; a listed step that cannot be read (corrupted files) is
skipped with a warning and the one before it is used.

Integrity: every save records a checksum of each array of the state (a position-weighted sum of its bit
patterns, computed on the devices where the array lives, so nothing is gathered); a restore recomputes them
and treats a mismatch (a flipped bit, a truncated or swapped chunk) like an unreadable checkpoint.

A full disk (or quota) while a save is written, which orbax reports from its background threads as a
RESOURCE_EXHAUSTED error with the errno only in the message, becomes one `DiskFullError`: the partial
checkpoint of that step (orbax's temporary directory) is removed, the complete ones are kept, and orbax's own
log records of it (a traceback per thread) are dropped. A failed save's event loop closes only once all of the
save's writes have ended (`_settled`), so none of them writes after the failure is reported.

A bucket whose storage service stops answering mid-run (a dead endpoint) must not hang the trainer: a save's
threads then retry for many minutes, so `wait` waits in a daemon thread and, while the save is unfinished,
probes the workdir every PROBE_TIMEOUT_S (yanjax/core/storage.py), raising StorageUnreachable when the probe
cannot connect. `committed` is the newest step known complete, remembered here, since the store that would
say so cannot be asked; orbax's log records of unreachable-store errors are dropped like the full-disk ones.

Restoring into a different mesh or device count works: the abstract state given to `restore_latest`
carries the new run's shardings, and orbax (tensorstore) reads each device's slice straight into place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging as std_logging
import os
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from orbax.checkpoint._src import asyncio_utils as orbax_asyncio

from yanjax.core import storage
from yanjax.core.config import ConfigError
from yanjax.core.errors import UserError
from yanjax.model.config import ModelConfig
from yanjax.model.lm import LanguageModel


class DiskFullError(UserError):
  """A checkpoint could not be written: the disk (or quota) under the workdir is full."""


class _DropDiskFullRecords(std_logging.Filter):
  """Drops log records that carry a full-disk or unreachable-store error: orbax logs one, with its traceback,
  from each thread a failed save ran in; the trainer reports it once (DiskFullError, StorageUnreachable)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    error = record.exc_info and record.exc_info[1]
    return not (error and (storage.is_disk_full(error) or storage.is_unreachable(error)))


async def _settled(coro):
  """Awaits `coro`; when it fails (or is cancelled), first waits for the other tasks on its event loop.

  Orbax runs a save's coroutine on an event loop of its own, in a background thread, and closes that loop as
  soon as the coroutine returns. A save fails at its first failed write (a full disk), out of an
  `asyncio.gather` that leaves the other writes running; when each of them ends, tensorstore passes its result
  to the closed loop (`call_soon_threadsafe`), and the RuntimeError 'Event loop is closed' goes to
  `sys.unraisablehook`, which prints its traceback. Waited for here, they end while the loop is open, and none
  writes into the failed step's directory after the save reported its error (that directory is then removed).
  """
  try:
    return await coro
  except (Exception, asyncio.CancelledError):
    others = asyncio.all_tasks() - {asyncio.current_task()}
    await asyncio.gather(*others, return_exceptions=True)  # their errors are retrieved, not logged as lost
    raise


def _run_settled(run_sync):
  """Orbax's `run_sync`, running each coroutine through `_settled`."""
  @functools.wraps(run_sync)
  def run(coro):
    return run_sync(_settled(coro))
  return run


orbax_asyncio.run_sync = _run_settled(orbax_asyncio.run_sync)  # orbax calls it as asyncio_utils.run_sync(...)


class Checkpointer:
  """Saves and restores {"state": train-state pytree, "meta": JSON dict} by step."""

  def __init__(self, workdir: str | os.PathLike, keep: int = 3, async_save: bool = True):
    self.workdir = storage.as_path(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True,
                                           atomicity_options=storage.orbax_atomicity(self.workdir))
    self.manager = ocp.CheckpointManager(self.workdir / "checkpoints", options=options,
                                         item_names=("state", "meta"))
    self.pending: int | None = None  # the step of a save that may still be written in the background
    self.committed: int | None = None  # the newest step known complete: restored, or a save waited for
    std_logging.getLogger("absl").addFilter(_DropDiskFullRecords())

  def steps(self) -> list[int]:
    """Steps of the complete checkpoints, and of saves still being written asynchronously."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]):
    """Saves `state` and `meta` (plus the state's checksums) as checkpoint `step` (asynchronously)."""
    self.wait()
    meta = {**meta, "checksums": state_checksums(state)}
    with self._disk_full_as_user_error(step):
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    self.pending = step

  def read_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_latest(self, abstract_state: Any, check_meta: Callable[[dict[str, Any]], None] = lambda _: None
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest readable checkpoint, or None when there is none.

    `abstract_state`: ShapeDtypeStructs with the target shardings (any mesh). `check_meta(meta)` runs on a
    checkpoint's metadata before its state is read and may raise (e.g. ConfigError for another model's
    checkpoint); that error propagates. Unreadable newer checkpoints (state or metadata) are moved to
    <workdir>/corrupt_checkpoints/ (kept for inspection, and out of the way of the run that now redoes
    those steps).
    """
    unreadable = []
    restored = None
    for step in reversed(self.steps()):
      try:
        meta = self.read_meta(step)
      except Exception as error:  # pylint: disable=broad-except  # unreadable metadata: try older
        logging.warning("checkpoint at step %d has unreadable metadata (%s: %s); trying the previous one", step,
                        type(error).__name__, (str(error).splitlines() or [""])[0][:300])
        unreadable.append(step)
        continue
      check_meta(meta)
      try:
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
        verify_checksums(state, meta.get("checksums"))
      except Exception as error:  # pylint: disable=broad-except  # any unreadable checkpoint: try older
        logging.warning("checkpoint at step %d is unreadable (%s: %s); trying the previous one", step,
                        type(error).__name__, (str(error).splitlines() or [""])[0][:300])
        unreadable.append(step)
        continue
      restored = (step, state, meta)
      self.committed = step
      break
    if unreadable and jax.process_index() == 0:
      quarantine = self.workdir / "corrupt_checkpoints"
      quarantine.mkdir(parents=True, exist_ok=True)
      for step in unreadable:
        (self.workdir / "checkpoints" / str(step)).rename(quarantine / f"{step}-{time.time_ns()}")
      logging.warning("moved unreadable checkpoints %s to %s", unreadable, quarantine)
    if unreadable:
      self.manager.reload()
    return restored

  def wait(self):
    """Waits for the last save to be written; DiskFullError when the disk filled up under it,
    StorageUnreachable when the workdir's storage service stopped answering while it was written."""
    step, self.pending = self.pending, None
    finished = self._finished()
    with self._disk_full_as_user_error(step):
      while True:
        try:
          finished.result(timeout=storage.PROBE_TIMEOUT_S)
          break
        except concurrent.futures.TimeoutError:
          if storage.is_remote(self.workdir):  # a slow save goes on; a dead store's save may never end
            storage.check_reachable(self.workdir)
    if step is not None:
      self.committed = step

  def committed_step(self, timeout_s: float) -> int | None:
    """The newest step known complete, after waiting at most `timeout_s` for a save still being written (after
    a storage failure: that save may never end, or fail, which leaves the step before it)."""
    if self.pending is not None:
      with contextlib.suppress(Exception):
        self._finished().result(timeout=timeout_s)
        self.committed = self.pending
    return self.committed

  def _finished(self) -> concurrent.futures.Future:
    """The outcome of orbax's `wait_until_finished`, which runs in a daemon thread: the interpreter's exit never
    waits for a wait on a store that stopped answering."""
    outcome = concurrent.futures.Future()

    def run():
      try:
        outcome.set_result(self.manager.wait_until_finished())
      except BaseException as error:  # pylint: disable=broad-except  # handed to the waiting thread
        outcome.set_exception(error)
    threading.Thread(target=run, name="checkpoint-wait", daemon=True).start()
    return outcome

  @contextlib.contextmanager
  def _disk_full_as_user_error(self, step: int | None):
    """A full-disk error of the block, which writes checkpoint `step`, as a DiskFullError."""
    try:
      yield
    except Exception as error:  # pylint: disable=broad-except  # orbax raises ValueError, OSError, ...
      if step is None or not storage.is_disk_full(error):
        raise
      raise self._disk_full(step) from error

  def _disk_full(self, step: int) -> DiskFullError:
    """Removes what the failed save of `step` left (orbax's temporary directory, never a complete checkpoint)
    and says which checkpoint a re-run resumes from."""
    directory = self.workdir / "checkpoints"
    if not storage.is_remote(directory):
      for partial in directory.glob(f"{step}{ocp.path.atomicity.TMP_DIR_SUFFIX}*"):
        storage.remove_tree(partial, missing_ok=True)
    self.manager.reload()
    kept = [s for s in self.manager.all_steps() if s != step]
    resume = f"the last good checkpoint, step {max(kept)}, is kept" if kept else "no earlier checkpoint exists"
    return DiskFullError(f"no space left on device writing the checkpoint at step {step} under {directory}; "
                         f"{resume}: free space or use another --workdir, then re-run the same command to resume")

  def close(self):
    self.manager.close()


@jax.jit
def _checksums(state):
  def checksum(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    bits = x.view(jnp.uint16).astype(jnp.uint32) if x.dtype.itemsize == 2 else x.astype(jnp.float32).view(
        jnp.uint32) if x.dtype.itemsize != 4 else x.view(jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape) * jnp.uint32(2654435761) + 1
    return jnp.sum(bits * weights, dtype=jnp.uint32)  # wraps mod 2^32: any one flipped bit changes it
  return jax.tree.map(checksum, state)


def state_checksums(state: Any) -> dict[str, int]:
  """{leaf path: uint32 checksum} of a state pytree, computed where its arrays live."""
  sums = jax.device_get(_checksums(state))
  return {jax.tree_util.keystr(path): int(value) for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]}


def verify_checksums(state: Any, expected: dict[str, int] | None):
  """Raises ValueError naming the arrays whose checksum differs from the one saved (None: not recorded)."""
  if expected is None:
    return
  actual = state_checksums(state)
  bad = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
  if bad:
    raise ValueError(f"checksums differ from the ones saved for {len(bad)} arrays, e.g. {bad[:3]}: the data "
                     "is damaged")


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Dotted parameter name -> shape, without allocating the model."""
  abstract = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
  return {".".join(map(str, path)): tuple(var.shape)
          for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def check_same_shapes(saved: ModelConfig, current: ModelConfig):
  """Refuses to resume when the config changes any parameter's shape (or the set of parameters)."""
  before, after = parameter_shapes(saved), parameter_shapes(current)
  changed = [f"{name}: checkpoint {before.get(name)} vs config {after.get(name)}"
             for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]
  if changed:
    raise ConfigError(
        "the workdir's checkpoints were written with a model config whose parameter shapes differ from this "
        "config's; resume with the original model settings or start a new --workdir. Differences: "
        + "; ".join(changed[:8]) + (f" (+{len(changed) - 8} more)" if len(changed) > 8 else ""))
