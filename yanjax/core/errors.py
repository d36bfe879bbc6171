"""The base of every error that is the user's to fix (a path, a key, a value, a file): the command line
prints its message as one line and exits 2 (yanjax.core.cli)."""


class UserError(ValueError):
  """Something the user asked for cannot be done; the message says what, where and how to fix it."""
