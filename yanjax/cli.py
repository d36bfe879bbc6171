"""Command-line entry points: a user error is one line on stderr and exit code 2, not a traceback."""

from __future__ import annotations

import os
import sys
from typing import Callable

from yanjax.config import ConfigError
from yanjax.data.errors import DataError

USAGE_EXIT_CODE = 2
# Errors that mean the user asked for something that cannot be done (a bad path, key, value or file);
# anything else is an internal error and keeps its traceback. --verbose (or YANJAX_VERBOSE=1) shows the
# traceback of user errors too.
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, PermissionError, IsADirectoryError)


def run(main: Callable[[], object], extra_user_errors: tuple[type[BaseException], ...] = ()) -> None:
  """Runs `main()` (which parses sys.argv); exits with its return value, or prints a user error's message
  and exits 2. A `--verbose` argument is taken out of sys.argv and shows the traceback instead."""
  verbose = "--verbose" in sys.argv[1:] or bool(os.environ.get("YANJAX_VERBOSE"))
  sys.argv[1:] = [arg for arg in sys.argv[1:] if arg != "--verbose"]
  try:
    status = main()
  except USER_ERRORS + extra_user_errors as error:
    if verbose:
      raise
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT_CODE)
  sys.exit(status if isinstance(status, int) else 0)
