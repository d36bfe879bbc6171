"""Errors of the data pipeline: each message says what was wrong and how to fix it."""

from yanjax.core.errors import UserError


class DataError(UserError):
  """Base class of every data-pipeline error."""


class CorpusError(DataError):
  """The input corpus is empty, unreadable, or lacks the configured text field."""


class StoreError(DataError):
  """A token store is missing, unfinished, or inconsistent with its metadata."""


class TokenizerMismatchError(DataError):
  """A tokenizer or vocabulary differs from the one the run asks for."""


class SequenceLengthError(DataError):
  """A split holds too little data for the requested sequence length and batch."""


class DiskFullError(DataError):
  """A task could not write its shards: the disk (or quota) under the store is full."""


class WorkerKilledError(DataError):
  """Every try of one task ended with its Ray worker dead (killed for memory, or crashed); `index` is the
  task's item."""

  def __init__(self, index: int, tries: int):
    super().__init__(f"task {index} killed its Ray worker {tries} times")
    self.index, self.tries = index, tries
