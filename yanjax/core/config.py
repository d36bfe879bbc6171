"""Config files and their errors.

Config files in `configs/` are Python files whose `get_config()` returns an `ml_collections.ConfigDict`
(`load_config_file`); its `model` entry becomes a `yanjax.model.config.ModelConfig`, its other sections are
the run (`yanjax.training.run_config`). A key that is unknown or holds an impossible value is a ConfigError
naming it.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
from typing import Sequence

from yanjax.core.errors import UserError


class ConfigError(UserError):
  """A config key is unknown or holds an impossible value."""


def load_config_file(spec: str | pathlib.Path):
  """Imports a Python config file and returns its `get_config(variant)` (an ml_collections.ConfigDict).

  `spec` is `path/to/config.py` or `path/to/config.py:variant` (the big_vision / config_flags convention).
  """
  path, _, variant = str(spec).partition(":")
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"yanjax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as error:
    raise syntax_error(error) from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config()")
  return module.get_config(variant) if variant else module.get_config()


def syntax_error(error: SyntaxError) -> ConfigError:
  """A Python file's (a config's, a sweep spec's) syntax error as one line naming its file and line."""
  return ConfigError(f"{error.filename}:{error.lineno}: Python syntax error ({error.msg}); fix the file")


def config_spec(argv: Sequence[str]) -> str:
  """The value of the last --config in a command line `argv` (the one absl keeps; '' if absent)."""
  found = ""
  for i, arg in enumerate(argv):
    if re.match(r"^--?config(=|$)", arg):
      found = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
  return found


def config_flag_error(argv: Sequence[str], error: Exception, default_spec: str = "", hint: str = "") -> str:
  """One line for a bad --config or --config.<key>=<value> (ml_collections' config_flags raise whatever the
  override hit): the config file's own error, the override whose key the config lacks and the keys it has,
  else `error` restated and `hint`."""
  spec = config_spec(argv) or default_spec
  try:
    node = load_config_file(spec)
  except Exception as load_error:  # pylint: disable=broad-except  # the config file's own error
    return f"--config={spec}: {' '.join(str(load_error).split())}"
  for arg in (a for a in argv if a.startswith("--config.")):
    keys = arg[len("--config."):].split("=", 1)[0].split(".")
    at = node
    for depth, key in enumerate(keys):
      if not hasattr(at, "keys") or key not in at.keys():
        section = ".".join(keys[:depth]) or "the config"
        known = ", ".join(sorted(at.keys())) if hasattr(at, "keys") else "none (not a section)"
        return f"{arg}: {section} has no key {key!r}; its keys are {known}"
      at = at[key]
  return f"{type(error).__name__}: {' '.join(str(error).split())}{hint}"
