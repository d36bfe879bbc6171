"""Metric writers: <workdir>/metrics.jsonl, TensorBoard events and Weights & Biases, behind one interface.

A small interface over the maintained libraries (tensorboardX, wandb) rather than clu's metric_writers:
clu's package imports TensorFlow, which yanjax does not install. Values are floats, or a string / None
("n/a" MFU); TensorBoard and W&B get the floats.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any, Protocol

import ml_collections

from yanjax.core import storage
from yanjax.training.hosts import process_zero


class Writer(Protocol):
  def write(self, step: int, scalars: dict[str, float | str | None]) -> None: ...
  def flush(self) -> None: ...
  def close(self) -> None: ...


class JsonlWriter:
  """One JSON record per write, {"step", "time", **scalars}, in <workdir>/metrics.jsonl.

  The workdir may be local or a bucket. Local files are appended and flushed at every record; an object
  store has no append, so there the whole file is rewritten (one upload) at most every `flush_seconds`
  and at `flush` / `close`. Opening with `resume_step` drops the records of steps after it (a run killed
  after its last checkpoint logged steps that the resumed run does again), so each step is in the file once.
  """

  def __init__(self, workdir, resume_step: int = 0, flush_seconds: float = 30.0):
    workdir = storage.as_path(workdir)
    self.path = workdir / "metrics.jsonl"
    self.remote = storage.is_remote(workdir)
    self.flush_seconds = flush_seconds
    self.last_flush = time.monotonic()
    self.lines = [line for line in (self.path.read_text().splitlines() if self.path.exists() else [])
                  if line.strip() and json.loads(line).get("step", 0) <= resume_step]
    self._rewrite()
    self.file = None if self.remote else self.path.open("a")

  def _rewrite(self):
    self.path.write_text("".join(line + "\n" for line in self.lines))
    self.last_flush = time.monotonic()

  def write(self, step, scalars):
    line = json.dumps({"step": step, "time": time.time(), **scalars})
    self.lines.append(line)
    if self.file is not None:
      self.file.write(line + "\n")
      self.file.flush()
    elif time.monotonic() - self.last_flush > self.flush_seconds:
      self._rewrite()

  def flush(self):
    """Makes every record so far durable (an upload on object stores)."""
    if self.file is None:
      self._rewrite()

  def close(self):
    self.flush()
    if self.file is not None:
      self.file.close()


# Unreachable-store errors that ended a background thread (tensorboardX's event writer), kept for the main thread.
_LOST_IN_THREADS: list[BaseException] = []


def _keep_unreachable_store_errors(hook):
  """`threading.excepthook` that keeps a thread's unreachable-store error (the trainer reports it once, as one
  line) instead of printing its traceback; every other error goes to `hook`."""
  def excepthook(args):
    if args.exc_value is not None and storage.is_unreachable(args.exc_value):
      _LOST_IN_THREADS.append(args.exc_value)
    else:
      hook(args)
  excepthook.keeps_unreachable = True
  return excepthook


class TensorBoardWriter:
  """Scalar events under <workdir>/tensorboard (tensorboardX; buckets through its own gs:// / s3:// support).

  tensorboardX writes from a background thread; when the store stopped answering, that thread's error is raised
  by the next `write` or `flush` (its queue, never emptied again, would block them)."""

  def __init__(self, workdir):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self.events = SummaryWriter(str(storage.as_path(workdir) / "tensorboard"))
    if not getattr(threading.excepthook, "keeps_unreachable", False):
      threading.excepthook = _keep_unreachable_store_errors(threading.excepthook)

  def write(self, step, scalars):
    self._raise_lost()
    for name, value in _floats(scalars).items():
      self.events.add_scalar(name, value, step)

  def flush(self):
    self._raise_lost()
    self.events.flush()

  def _raise_lost(self):
    if _LOST_IN_THREADS:
      raise storage.StorageUnreachable(f"the TensorBoard events could not be written: {_LOST_IN_THREADS[0]}"
                                       ) from _LOST_IN_THREADS[0]

  def close(self):
    self.events.close()


class WandbWriter:
  """A Weights & Biases run in `train.wandb_project`, mode `train.wandb_mode` ("online" / "offline").

  The run id is derived from the workdir, so a resumed run continues the same W&B run; W&B keeps the first
  record of a step, and the steps a killed run logged after its last checkpoint are the same values again
  (every batch is a function of (seed, step)). Local files go where W&B puts them: $WANDB_DIR/wandb, or
  ./wandb ("offline" runs are uploaded later with `wandb sync`).
  """

  def __init__(self, workdir, cfg: ml_collections.ConfigDict):
    import wandb  # pylint: disable=import-outside-toplevel  # only where W&B is on
    self.run = wandb.init(project=cfg.train.wandb_project, mode=cfg.train.wandb_mode, id=wandb_run_id(workdir),
                          name=storage.as_path(workdir).name, resume="allow", config=cfg.to_dict())

  def write(self, step, scalars):
    self.run.log(_floats(scalars), step=step)

  def flush(self):
    pass  # W&B's own process writes and uploads as records arrive

  def close(self):
    self.run.finish()


class Writers:
  """Writes to every writer it holds (none on processes other than 0)."""

  def __init__(self, writers: list[Writer]):
    self.writers = writers

  def write(self, step: int, scalars: dict[str, Any]):
    scalars = {name: value if value is None or isinstance(value, str) else float(value)
               for name, value in scalars.items()}
    for writer in self.writers:
      writer.write(step, scalars)

  def flush(self):
    for writer in self.writers:
      writer.flush()

  def close(self):
    for writer in self.writers:
      writer.close()


def open_writers(workdir, cfg: ml_collections.ConfigDict, resume_step: int = 0) -> Writers:
  """On process 0: metrics.jsonl (resumed at `resume_step`), TensorBoard, and W&B when `train.wandb_project`
  is set. On the other processes: no writer."""
  if not process_zero():
    return Writers([])
  writers = [JsonlWriter(workdir, resume_step), TensorBoardWriter(workdir)]
  if cfg.train.wandb_project:
    writers.append(WandbWriter(workdir, cfg))
  return Writers(writers)


def wandb_run_id(workdir) -> str:
  """The W&B run id of a work directory: 16 hex digits of the sha256 of its absolute path or URL."""
  return hashlib.sha256(str(storage.as_path(workdir)).rstrip("/").encode()).hexdigest()[:16]


def _floats(scalars: dict[str, Any]) -> dict[str, float]:
  return {name: value for name, value in scalars.items() if isinstance(value, float)}
