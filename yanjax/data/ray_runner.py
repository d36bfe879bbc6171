"""Running preparation tasks on Ray Data: locally (a Ray head started for the run) or on a cluster.

`connect` joins the cluster at `--ray_address` (or $RAY_ADDRESS), or starts a Ray head on this machine with one
CPU a worker (yanjax.data.ray_local: its own program, not a fork of this process). Tasks run with the driver's
storage variables (FORWARDED_ENV, where set), so a bucket the driver reaches is reached by every task; the
variables travel in the tasks' runtime environment.

`run` maps a task over items, one item a block, so Ray schedules, retries and streams the results back. A task
whose worker dies (killed for memory, a crash in native code) is run again, `max_tries` times in all; then the
run fails with a `WorkerKilledError` naming the item (yanjax.data.task_attempts counts the tries). A task's
result crosses as one pickled value (rows of one schema, whatever the task returns), and a `UserError` it
raises as a value too, which `run` raises again on the driver as that class, so the user sees one line, not a
remote traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
from typing import Any, Callable, Iterator

from yanjax.core import storage
from yanjax.core.errors import UserError
from yanjax.data import errors as data_errors
from yanjax.data import ray_local, task_attempts

# Each task is one core: the tokenizers' own thread pools stay at one thread.
_WORKER_ENV = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
_CONNECT_TIMEOUT_S = 10
_INDEX = "_yanjax_item"  # the item's position in `run`'s list, added to its row
# Where buckets are and who reads them: the driver's settings, when it has them, are the tasks' too.
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT",
                 "YANJAX_STORAGE_TIMEOUT_S")


@contextlib.contextmanager
def connect(address: str | None, num_workers: int | None) -> Iterator[None]:
  """Ray for the block: the cluster at `address` (or $RAY_ADDRESS), an already initialized Ray, or a local one
  with `num_workers` CPUs (default: the cores this process may use). A Ray this call started is shut down."""
  import ray  # pylint: disable=import-outside-toplevel  # Ray is slow to import; only preparation needs it
  if ray.is_initialized():
    yield
    return
  address = address or os.environ.get("RAY_ADDRESS")
  with contextlib.ExitStack() as stack:
    if not address:  # a head of our own, started as a program: never forked from this (maybe JAX) process
      try:
        address = stack.enter_context(ray_local.head_node(num_workers or len(os.sched_getaffinity(0))))
      except RuntimeError as e:
        raise data_errors.DataError(f"cannot start Ray on this machine: {e}") from e
      stack.enter_context(_environment(ray_local.ENV))
    try:
      _check_reachable(address)
      ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, OSError, ValueError, RuntimeError) as e:
      raise data_errors.DataError(f"--ray_address {address}: cannot join the Ray cluster ({e}); start it with "
                                  "`ray start --head`, or leave --ray_address out to run on this machine") from e
    stack.callback(ray.shutdown)
    yield


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
  """These environment variables set for the block, the previous values back after."""
  saved = {name: os.environ.get(name) for name in variables}
  os.environ.update(variables)
  try:
    yield
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


def _check_reachable(address: str | None):
  """OSError unless a cluster's `host:port` accepts a connection (ray.init would retry it for minutes)."""
  host, _, port = (address or "").rpartition(":")
  if "://" in (address or "") or not host or not port.isdigit():
    return  # none, "auto" (found by Ray itself) or a ray:// client address, which times out by itself
  with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S):
    pass


def run(task: Callable[[dict[str, Any]], Any], items: list[dict[str, Any]], num_workers: int | None,
        progress: bool, max_tries: int) -> Iterator[Any]:
  """task(item) for every item, at most `num_workers` at once (None: as many as the cluster has CPUs), results
  in completion order. Raises the first UserError a task raised, and WorkerKilledError for an item whose
  worker died in each of its `max_tries` tries."""
  import ray.data  # pylint: disable=import-outside-toplevel
  context = ray.data.DataContext.get_current()
  context.enable_progress_bars = progress
  context.print_on_execution_start = False
  logging.getLogger("ray.data").setLevel(logging.WARNING)
  env = {**_WORKER_ENV, **{name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}}
  attempts = task_attempts.start_actor()
  rows = [{_INDEX: index, **item} for index, item in enumerate(items)]
  dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(items))).map(
      _Pickling(task, attempts, max_tries), compute=ray.data.TaskPoolStrategy(size=num_workers), num_cpus=1,
      runtime_env={"env_vars": env})
  results = iter(dataset.iter_rows())
  try:
    for row in results:
      if row["killed"]:
        raise data_errors.WorkerKilledError(row[_INDEX], row["killed"])
      if row["error"]:
        raise _user_error(row["error"], row["message"])
      yield pickle.loads(row["result"])
  finally:
    results.close()  # stops the execution now, not when the generator is collected (after Ray is shut down)
    ray.kill(attempts)


class _Pickling:
  """`task` returning {"result": its pickled value, "error": "", "message": ""}, or a UserError's class name
  and message; "killed": the tries, instead of a try past `max_tries` (the workers of all earlier ones died)."""

  def __init__(self, task: Callable[[dict[str, Any]], Any], attempts: Any, max_tries: int):
    self.task, self.attempts, self.max_tries = task, attempts, max_tries

  def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
    import ray  # pylint: disable=import-outside-toplevel
    item = dict(row)
    index = item.pop(_INDEX)
    reply = {_INDEX: index, "killed": 0, "result": b"", "error": "", "message": ""}
    if ray.get(self.attempts.start.remote(index)) > self.max_tries:
      return {**reply, "killed": self.max_tries}
    try:
      return {**reply, "result": pickle.dumps(self.task(item))}
    except UserError as e:
      return {**reply, "error": type(e).__name__, "message": str(e)}
    except Exception as e:  # pylint: disable=broad-except  # a full disk is the user's; anything else re-raises
      if not storage.is_disk_full(e):
        raise
      return {**reply, "error": "DiskFullError", "message": " ".join(str(e).split())[:500]}


def _user_error(name: str, message: str) -> UserError:
  error_class = getattr(data_errors, name, None)
  if not (isinstance(error_class, type) and issubclass(error_class, UserError)):
    error_class = data_errors.DataError
  return error_class(message)
