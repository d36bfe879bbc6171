"""Conditional writes of small files: create only if absent, replace or delete only if unchanged since read.

What makes a lease (yanjax/training/lease.py) safe with several writers. `read` returns a file's bytes with a
token naming that version of it; `create` and `replace` return the new version's token; a condition that does
not hold raises `PreconditionFailed`, and the caller re-reads to see who won.

- S3: PutObject with `If-None-Match: *` (create) or `If-Match: <ETag>` (replace), DeleteObject with
  `If-Match: <ETag>`, through s3fs's client (so the endpoint and credentials are those of every other path).
  The store decides, so the checks are atomic; a store that ignores these headers makes them unconditional.
- GCS: the JSON API's `ifGenerationMatch` (0 to create, the generation read to replace or delete) through
  gcsfs. Implemented against the documented API but untested here: the tests have no GCS server.
- Local disk: create is atomic (a hard link that fails if the name exists); replace and delete compare the
  file's content hash, then rename or unlink: a check-then-act, not atomic against a writer in between.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from urllib.parse import quote

from etils import epath
from fsspec import asyn

from yanjax.core import storage

_S3_CONFLICT_CODES = ("PreconditionFailed", "ConditionalRequestConflict")  # 412, and 409 for a write in flight


class PreconditionFailed(Exception):
  """A conditional write did not happen: the file exists (create), or changed or went since it was read."""


def read(path: epath.Path) -> tuple[bytes, str] | None:
  """(content, version token) of `path`, read in one request; None when it does not exist."""
  path = storage.as_path(path)
  try:
    if not storage.is_remote(path):
      data = path.read_bytes()
      return data, hashlib.sha256(data).hexdigest()
    fs = _filesystem(path)
    return asyn.sync(fs.loop, _s3_read if _scheme(path) == "s3" else _gcs_read, fs, path)
  except FileNotFoundError:
    return None


def create(path: epath.Path, data: bytes) -> str:
  """Writes `path` if no file has that name; returns its token. PreconditionFailed if one exists."""
  path = storage.as_path(path)
  if not storage.is_remote(path):
    temp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    temp.write_bytes(data)
    try:
      os.link(temp, path)
    except FileExistsError:
      raise PreconditionFailed(f"{path} exists") from None
    finally:
      temp.unlink()
    return hashlib.sha256(data).hexdigest()
  return _remote_write(path, data, None)


def replace(path: epath.Path, data: bytes, token: str) -> str:
  """Writes `path` if it is still the version `token`; returns the new token. PreconditionFailed if not."""
  path = storage.as_path(path)
  if not storage.is_remote(path):
    _check_local(path, token)
    storage.write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()
  return _remote_write(path, data, token)


def delete(path: epath.Path, token: str) -> None:
  """Deletes `path` if it is still the version `token`. PreconditionFailed if not (or if it is gone)."""
  path = storage.as_path(path)
  if not storage.is_remote(path):
    _check_local(path, token)
    path.unlink()
    return
  fs = _filesystem(path)
  bucket, key, _ = fs.split_path(os.fspath(path))
  with _conditions(path):
    if _scheme(path) == "s3":
      fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=token)
    else:
      fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=token)
  fs.invalidate_cache(os.fspath(path))


def _check_local(path: epath.Path, token: str) -> None:
  current = read(path)
  if current is None or current[1] != token:
    raise PreconditionFailed(f"{path} changed since it was read")


def _remote_write(path: epath.Path, data: bytes, token: str | None) -> str:
  """One upload of `data` to `path`: created if `token` is None, else replacing the version `token`."""
  fs = _filesystem(path)
  bucket, key, _ = fs.split_path(os.fspath(path))
  with _conditions(path):
    if _scheme(path) == "s3":
      condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
      new_token = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
    else:
      new_token = str(fs.call("POST", f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o",  # pylint: disable=protected-access
                              uploadType="media", name=key, ifGenerationMatch="0" if token is None else token,
                              data=data, json_out=True)["generation"])
  fs.invalidate_cache(os.fspath(path))
  return new_token


@contextlib.contextmanager
def _conditions(path):
  """Turns the stores' answers to a failed condition into PreconditionFailed: S3's 412 / 409 (s3fs raises
  OSError, FileExistsError or, for a missing object, FileNotFoundError), GCS's 412 (gcsfs: FileExistsError)."""
  try:
    yield
  except (FileExistsError, FileNotFoundError) as error:
    raise PreconditionFailed(f"{path}: {error}") from error
  except OSError as error:
    if _s3_code(error) in _S3_CONFLICT_CODES:
      raise PreconditionFailed(f"{path}: {error}") from error
    raise


def _s3_code(error: BaseException | None) -> str | None:
  """The S3 error code of a botocore ClientError that `error` was raised from (s3fs wraps it)."""
  while error is not None:
    response = getattr(error, "response", None)
    if isinstance(response, dict) and "Error" in response:
      return response["Error"].get("Code")
    error = error.__cause__ or error.__context__
  return None


async def _s3_read(fs, path) -> tuple[bytes, str]:
  bucket, key, _ = fs.split_path(os.fspath(path))
  response = await fs._call_s3("get_object", Bucket=bucket, Key=key)  # pylint: disable=protected-access
  async with response["Body"] as body:
    return await body.read(), response["ETag"]


async def _gcs_read(fs, path) -> tuple[bytes, str]:
  headers, data = await fs._call("GET", fs.url(os.fspath(path)))  # pylint: disable=protected-access
  return data, headers["X-Goog-Generation"]


def _filesystem(path):
  return epath.backend.fsspec_backend.fs(os.fspath(path))


def _scheme(path) -> str:
  return os.fspath(path).split("://", 1)[0]
