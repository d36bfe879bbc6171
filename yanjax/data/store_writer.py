"""Publishing a token store atomically: it is built in `<out>.tmp-<fingerprint>`, then moved into place with
metadata.json last.

`<out>` is a local directory or an object-store prefix (gs://, s3://). The temporary directory is named by the
preparation's fingerprint, so a re-run of the same preparation finds the shards an interrupted one wrote
(yanjax.data.prepare). On local disk the finished temporary directory is renamed into place in one
`os.replace`. Object stores have no directory rename: the objects are copied server-side to `<out>`,
metadata.json last (a store without it is never trusted), then the temporary prefix is deleted. Replacing a
store deletes its metadata.json first. The layout and metadata fields are those `yanjax.data.store` reads
(see docs/data.md).
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from yanjax.core import storage
from yanjax.data import store as store_format
from yanjax.data import tokenizer
from yanjax.data.errors import StoreError


def temporary_directory(out: epath.Path, fingerprint: str) -> epath.Path:
  """Where the store of `fingerprint` is built: `<out>.tmp-<fingerprint[:16]>` beside `out`."""
  return out.parent / f"{out.name}{store_format.TEMP_MARKER}{fingerprint[:16]}"


def publish(temp_dir: epath.Path, out: epath.Path, metadata: dict[str, Any], overwrite: bool):
  """Writes `metadata` as temp_dir's metadata.json (fsync'ed locally, one PUT on object stores), then moves
  the finished store to `out`."""
  text = json.dumps(metadata, indent=2, sort_keys=True)
  if storage.is_remote(temp_dir):
    (temp_dir / store_format.METADATA_FILE).write_text(text)  # one PUT: never half-visible
  else:
    partial = temp_dir / f"{store_format.METADATA_FILE}.partial"
    with open(partial, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(partial, temp_dir / store_format.METADATA_FILE)
  replace_directory(temp_dir, out, overwrite)


STORE_ENTRIES = (store_format.METADATA_FILE, f"{store_format.METADATA_FILE}.partial", *tokenizer.FILE_NAMES.values(),
                 store_format.UNITS_DIR, *store_format.SPLITS)  # the top level of a store, finished or not


def foreign_entries(directory: epath.Path) -> list[str]:
  """Names at the top of `directory` that a token store does not have (empty: yanjax may replace it)."""
  return storage.foreign_entries(directory, STORE_ENTRIES)


def replace_directory(source: epath.Path, target: epath.Path, overwrite: bool):
  """Moves the finished store `source` to `target` (`storage.replace_directory`, metadata.json last); an
  existing `target` is replaced only with `overwrite`, and only when it holds nothing but a token store."""
  storage.forget_listings(target)
  if target.exists():
    if not overwrite:
      raise StoreError(f"{target} exists; pass --overwrite to replace it")
    if foreign_entries(target):
      raise StoreError(f"{target} holds files that are not part of a token store; it is never replaced")
  try:
    storage.replace_directory(source, target, store_format.METADATA_FILE)
  except Exception as e:  # pylint: disable=broad-except  # gcsfs and botocore errors are not all OSErrors
    raise StoreError(f"publishing {target} failed: {storage.describe_storage_error(e, target)}; "
                     "re-run data_pipelines.prepare with --overwrite") from e
