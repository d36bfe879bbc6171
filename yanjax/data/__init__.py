"""Token stores and the batch loader (see docs/data.md)."""

from yanjax.data.errors import (CorpusError, DataError, SequenceLengthError, StoreError,
                                TokenizerMismatchError)
from yanjax.data.loader import Loader, make_loader
from yanjax.data.store import Store, StoreSplit, open_store
