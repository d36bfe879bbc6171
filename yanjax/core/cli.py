"""Command-line entry points: a user error is one line on stderr and exit code 2, not a traceback."""

from __future__ import annotations

import errno
import math
import os
import sys
from typing import Callable, Sequence

from yanjax.core.errors import UserError

USAGE_EXIT_CODE = 2  # a user error: one line on stderr
PREEMPTED_EXIT_CODE = 42  # saved after SIGTERM/SIGINT or a preemption notice: a scheduler should requeue
# Errors that mean the user asked for something that cannot be done (a bad path, key, value or file);
# anything else is an internal error and keeps its traceback. --verbose (or YANJAX_VERBOSE=1) shows the
# traceback of user errors too.
USER_ERRORS = (UserError, FileNotFoundError, PermissionError, IsADirectoryError)
# Storage faults the user fixes (disk full, quota, read-only filesystem): reported with the path.
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")  # argparse's and absl's


def wants_help(argv: Sequence[str]) -> bool:
  """Whether the command line `argv` (program name first) asks for help: printing it is not an error."""
  return any(arg in HELP_FLAGS for arg in argv[1:])


def check_generation_flags(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
  """Refuses generation flags the sampler cannot honour (the rules of yanjax.inference.sampling.Sampling),
  before a model is loaded; shared by `yanjax.main.generate` and the NumPy runtime (no JAX here)."""
  if max_new_tokens < 1:
    raise UserError(f"--max_new_tokens={max_new_tokens}: must be >= 1")
  if not (math.isfinite(temperature) and temperature >= 0):
    raise UserError(f"--temperature={temperature}: must be a number >= 0 (0 = greedy)")
  if top_k < 0:
    raise UserError(f"--top_k={top_k}: must be >= 0 (0 = off)")
  if not 0 < top_p <= 1:
    raise UserError(f"--top_p={top_p}: must be in (0, 1] (1 = off)")


def is_user_error(error: BaseException, extra: tuple[type[BaseException], ...] = ()) -> bool:
  return isinstance(error, USER_ERRORS + extra) or (isinstance(error, OSError) and error.errno in USER_ERRNOS)


def describe(error: BaseException) -> str:
  """One line: the error's message, with the path an OSError names."""
  if isinstance(error, OSError) and error.errno in USER_ERRNOS and error.strerror:
    return f"{error.strerror}: {error.filename or 'a path under the output'}"
  return " ".join(str(error).split())


def run(main: Callable[[], object], extra_user_errors: tuple[type[BaseException], ...] = ()) -> None:
  """Runs `main()` (which parses sys.argv); exits with its return value, or prints a user error's message
  and exits 2. A `--verbose` argument is taken out of sys.argv and shows the traceback instead."""
  verbose = "--verbose" in sys.argv[1:] or bool(os.environ.get("YANJAX_VERBOSE"))
  sys.argv[1:] = [arg for arg in sys.argv[1:] if arg != "--verbose"]
  try:
    status = main()
  except Exception as error:  # pylint: disable=broad-except  # user errors become one line; others re-raise
    if verbose or not is_user_error(error, extra_user_errors):
      raise
    print(f"error: {describe(error)}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT_CODE)
  sys.exit(status if isinstance(status, int) else 0)
