"""Paths a user gives: local paths or object-store URLs (`gs://bucket/key`, `s3://bucket/key`).

Every user path goes through `as_path` (an `etils.epath.Path`: pathlib's API over local disk, GCS through
gcsfs and S3 through s3fs), and every tensorstore array through `kvstore` (tensorstore's `file`, `gcs` or
`s3` driver). S3-compatible servers (MinIO, Ceph, a local test server) are reached through the standard
`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` variables, which boto3 and s3fs read themselves and which
`kvstore` passes to tensorstore, since tensorstore reads no endpoint variable.

orbax-checkpoint (0.12) builds tensorstore specs for `gs://` and local paths only; `_teach_orbax_s3` tells it
the `s3` driver (the same change orbax's open S3 pull request makes), so checkpoints live in S3 buckets too.
Checkpoints on object stores commit with a `commit_success.txt` file rather than a directory rename, which
object stores do not have; `replace_directory` moves any other finished directory into place the same way
on both (a rename locally; server-side copies with the manifest last on object stores).
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import re
import secrets
import shutil
from collections.abc import Collection
from typing import Any

from etils import epath

from yanjax.core.config import ConfigError
from yanjax.core.errors import UserError

REMOTE_SCHEMES = ("gs", "s3")
PROBE_TIMEOUT_S = float(os.environ.get("YANJAX_STORAGE_TIMEOUT_S", "60"))
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(/*)")


def check_url(path: str) -> None:
  """Raises ConfigError for a URL whose scheme yanjax cannot use (a typo such as `gcs://` or `s3:/b`)."""
  match = _SCHEME.match(str(path))
  if match is None or len(match.group(1)) == 1:  # no scheme (or a Windows drive letter)
    return
  scheme, slashes = match.group(1), match.group(2)
  if scheme not in REMOTE_SCHEMES:
    raise ConfigError(f"{path}: unknown storage scheme {scheme}://; use a local path, gs://bucket/... "
                      "(Google Cloud Storage) or s3://bucket/... (S3 and S3-compatible stores)")
  if slashes != "//" or not str(path)[len(scheme) + 3:].split("/")[0]:
    raise ConfigError(f"{path}: malformed URL; write {scheme}://bucket/path")


def as_path(path: str | os.PathLike) -> epath.Path:
  """The epath of a user path (local paths made absolute, so orbax and tensorstore accept them)."""
  if isinstance(path, epath.Path) and is_remote(path):
    return path
  check_url(os.fspath(path))
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.fspath(path)))


def is_remote(path: str | os.PathLike) -> bool:
  return os.fspath(path).startswith(tuple(f"{s}://" for s in REMOTE_SCHEMES))


def s3_endpoint() -> str | None:
  """The S3 endpoint override from the environment (as boto3 reads it), or None for AWS itself."""
  return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def kvstore(path: str | os.PathLike) -> dict[str, Any]:
  """The tensorstore kvstore spec of a directory or file path (local, gs:// or s3://)."""
  text = os.fspath(path)
  if not is_remote(text):
    return {"driver": "file", "path": os.fspath(as_path(text))}
  scheme, rest = text.split("://", 1)
  bucket, _, key = rest.partition("/")
  if scheme == "gs":
    return {"driver": "gcs", "bucket": bucket, "path": key}
  spec = {"driver": "s3", "bucket": bucket, "path": key}
  endpoint = s3_endpoint()
  if endpoint:
    spec["endpoint"] = endpoint
    spec["aws_region"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
  if os.environ.get("AWS_ACCESS_KEY_ID"):  # the keys boto3 uses; skips tensorstore's noisy profile-file search
    spec["aws_credentials"] = {"type": "environment"}
  return spec


def write_atomic(path: epath.Path, data: str | bytes) -> None:
  """Writes `path` whole or not at all: one upload on an object store, a renamed temporary file locally."""
  path = as_path(path)
  target = path if is_remote(path) else path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
  (target.write_bytes if isinstance(data, bytes) else target.write_text)(data)
  if target != path:
    target.replace(path)


def is_bucket_root(path) -> bool:
  """Whether `path` is a whole bucket (gs://b or s3://b), which holds no directory of ours."""
  return is_remote(path) and "/" not in _key(path)


def temporary_sibling(path: epath.Path) -> epath.Path:
  """A new name beside `path`, `<name>.tmp-<random>`, to build a replacement for it in."""
  return path.parent / f"{path.name}.tmp-{secrets.token_hex(4)}"


def foreign_entries(directory: epath.Path, allowed: Collection[str]) -> list[str]:
  """Names at the top of `directory` outside `allowed` (none when it does not exist; a file there is one)."""
  if is_remote(directory):
    _filesystem(directory)  # drops cached listings: other processes write there too
  if not directory.exists():
    return []
  if not directory.is_dir():
    return [directory.name]
  return sorted(p.name for p in directory.iterdir() if p.name not in allowed)


def replace_directory(source: epath.Path, target: epath.Path, manifest: str) -> None:
  """Moves the finished directory `source` (whose `manifest` file marks it complete) to `target`, replacing
  what `target` holds; the caller has checked that `target` may be replaced.

  Local: renames (an old `target` is renamed aside first, and removed once `source` is in place). Object
  stores, which cannot rename: `target` loses its old manifest first, then its other objects; `source`'s
  objects are copied server-side, the manifest last, so a reader never trusts a half-copied directory; then
  `source` is deleted.
  """
  if not is_remote(target):
    if not target.exists():
      os.replace(source, target)
      return
    old = target.parent / f"{target.name}.old-{secrets.token_hex(4)}"
    os.replace(target, old)
    try:
      os.replace(source, target)
    except BaseException:
      os.replace(old, target)
      raise
    if os.path.islink(old):  # a link to the old directory: the link goes, what it pointed to stays
      os.unlink(old)
    else:
      shutil.rmtree(old)
    return
  fs = _filesystem(target)
  old = _objects(fs, target)
  old_manifest = f"{_key(target)}/{manifest}"
  if old_manifest in old:
    fs.rm_file(old_manifest)
  rest = [key for key in old if key != old_manifest]
  if rest:
    fs.rm(rest)
  objects = _objects(fs, source)
  last = f"{_key(source)}/{manifest}"
  if last not in objects:
    raise ValueError(f"{source} has no {manifest}; it is not finished")
  rest = [key for key in objects if key != last]
  if rest:
    fs.copy(rest, [_key(target) + key[len(_key(source)):] for key in rest])  # server-side, concurrent
  fs.copy(last, _key(target) + last[len(_key(source)):])
  fs.rm(objects)


def remove_tree(path: epath.Path, missing_ok: bool = False) -> None:
  """Deletes a local directory, or every object under a remote prefix."""
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=missing_ok)
    return
  try:
    fs = _filesystem(path)
    objects = _objects(fs, path)
    if objects:
      fs.rm(objects)
  except OSError:
    if not missing_ok:
      raise


def forget_listings(path) -> None:
  """Drops fsspec's cached listings of a remote `path`: tensorstore and other processes write there behind
  its back, so a cached listing may deny an object that exists (or show a deleted one)."""
  if is_remote(path):
    epath.backend.fsspec_backend.fs(os.fspath(path)).invalidate_cache()


def _filesystem(path: epath.Path):
  """The fsspec filesystem of a remote path, its cached listings dropped."""
  forget_listings(path)
  return epath.backend.fsspec_backend.fs(os.fspath(path))


def _key(path: epath.Path) -> str:
  """`bucket/key` of a remote path, as fsspec names objects."""
  return os.fspath(path).split("://", 1)[1].rstrip("/")


def _objects(fs, prefix: epath.Path) -> list[str]:
  """Every object under the remote directory `prefix` (not its siblings that share the name's start)."""
  return sorted(fs.find(_key(prefix) + "/"))


def check_writable(directory: epath.Path, what: str, fix: str) -> None:
  """Creates `directory` and writes and deletes a probe object in it; ConfigError naming the path if not.

  Runs with a deadline (YANJAX_STORAGE_TIMEOUT_S, default 60 s) so an unreachable endpoint fails fast
  instead of retrying for minutes.
  """
  def probe():
    if not is_remote(directory):  # object stores have no directories (and s3fs's mkdir creates buckets)
      directory.mkdir(parents=True, exist_ok=True)
    marker = directory / f".yanjax-write-probe-{secrets.token_hex(4)}"
    marker.write_text("probe")
    marker.unlink()

  run_with_deadline(probe, directory, what, fix)


def check_readable(path: epath.Path, what: str, fix: str) -> bool:
  """Whether `path` exists; ConfigError naming it when the store behind it cannot be reached or read."""
  return run_with_deadline(path.exists, path, what, fix)


def run_with_deadline(fn, path, what: str, fix: str):
  """fn() with storage errors (and a deadline) turned into one ConfigError that names `path`."""
  pool = concurrent.futures.ThreadPoolExecutor(1)
  try:
    return pool.submit(fn).result(timeout=PROBE_TIMEOUT_S)
  except concurrent.futures.TimeoutError:
    raise ConfigError(f"{what} {path}: no answer from the storage service in {PROBE_TIMEOUT_S:.0f} s "
                      f"({endpoint_hint(path)}); {fix}") from None
  except Exception as error:  # pylint: disable=broad-except  # every storage failure becomes one clear line
    raise ConfigError(f"{what} {path}: {describe_storage_error(error, path)}; {fix}") from error
  finally:
    pool.shutdown(wait=False)


class StorageUnreachable(UserError):
  """The storage service of a path stopped answering (refused connections, or no answer in PROBE_TIMEOUT_S)."""


# How s3fs, gcsfs, botocore and aiohttp say that the service cannot be reached (lower case).
_UNREACHABLE_MARKERS = ("could not connect", "connect timeout", "connection refused", "connect call failed",
                        "endpointconnectionerror", "name or service not known", "cannot connect")


def is_unreachable(error: BaseException | None) -> bool:
  """Whether `error`, or an error it was raised from, says that the storage service cannot be reached."""
  while error is not None:
    if isinstance(error, StorageUnreachable) or any(
        marker in f"{type(error).__name__}: {error}".lower() for marker in _UNREACHABLE_MARKERS):
      return True
    error = error.__cause__ or error.__context__
  return False


def check_reachable(directory: epath.Path) -> None:
  """StorageUnreachable when a probe write into `directory` gets no answer in PROBE_TIMEOUT_S or cannot connect;
  other failures are left to the operation that meets them. For waits on a store that may have died."""
  try:
    check_writable(directory, "workdir", "check that its storage service runs")
  except ConfigError as error:
    if error.__cause__ is None or is_unreachable(error.__cause__):  # no cause: the probe's deadline passed
      raise StorageUnreachable(str(error)) from error


def describe_storage_error(error: BaseException, path) -> str:
  """A one-line reason for a storage failure: missing bucket, credentials, permission, endpoint."""
  chain, cause = [], error
  while cause is not None and len(chain) < 8:  # s3fs and gcsfs wrap the service's own error
    chain.append(f"{type(cause).__name__}: {cause}")
    cause = cause.__cause__ or cause.__context__
  text = chain[0]
  lowered = " | ".join(chain).lower()
  bucket = os.fspath(path).split("://", 1)[-1].split("/")[0]
  if "nosuchbucket" in lowered or ("bucket" in lowered and "not exist" in lowered):
    return f"the bucket {bucket!r} does not exist (create it, or correct the bucket name)"
  if any(s in lowered for s in ("nocredentials", "unable to locate credentials", "could not find default "
                                 "credentials", "defaultcredentialserror")):
    return ("no credentials found (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for s3://, or "
            "`gcloud auth application-default login` / GOOGLE_APPLICATION_CREDENTIALS for gs://)")
  if any(s in lowered for s in ("invalidaccesskeyid", "signaturedoesnotmatch", "invalid_grant",
                                 "invalidtoken", "expiredtoken", "access key id you provided does not exist",
                                 "signature we calculated does not match", "security token included")):
    return "the credentials were rejected (check the access key and secret, or refresh the token)"
  if isinstance(error, PermissionError) or any(s in lowered for s in ("accessdenied", "access denied",
                                                                       "forbidden", "403")):
    return "permission denied (the credentials may read but not write here, or not read at all)"
  if any(s in lowered for s in _UNREACHABLE_MARKERS):
    return f"cannot reach the storage service ({endpoint_hint(path)})"
  if isinstance(error, OSError) and error.strerror:
    return f"{error.strerror}"
  return text.splitlines()[0][:300]


def endpoint_hint(path) -> str:
  """Which service holds `path`: the S3 endpoint (and how to set another), GCS, or the local filesystem."""
  if os.fspath(path).startswith("s3://"):
    return f"endpoint {s3_endpoint() or 'AWS default'}; AWS_ENDPOINT_URL sets another"
  if os.fspath(path).startswith("gs://"):
    return "Google Cloud Storage"
  return "local filesystem"


def _teach_orbax_s3() -> None:
  """Makes orbax's tensorstore layer write s3:// checkpoints through tensorstore's `s3` driver."""
  import types  # pylint: disable=import-outside-toplevel

  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu  # pylint: disable=import-outside-toplevel
  if getattr(tsu, "_yanjax_s3", False):
    return
  for name in ("_normalize_path", "_use_gcs_driver", "gcs_utils"):
    if not hasattr(tsu, name):
      raise ImportError(f"orbax-checkpoint changed ({name} is gone): yanjax's S3 support needs updating")
  normalize, use_bucket_driver, gcs = tsu._normalize_path, tsu._use_gcs_driver, tsu.gcs_utils  # pylint: disable=protected-access
  tsu._normalize_path = lambda p: (f"s3://{os.path.normpath(p[5:])}" if p.startswith("s3://")  # pylint: disable=protected-access
                                   else normalize(p))
  tsu._use_gcs_driver = lambda d: d.startswith("s3://") or use_bucket_driver(d)  # pylint: disable=protected-access
  bucket_utils = types.SimpleNamespace(**{k: getattr(gcs, k) for k in dir(gcs) if not k.startswith("__")})
  bucket_utils.get_kvstore_for_gcs = lambda p: kvstore(p) if p.startswith("s3://") else gcs.get_kvstore_for_gcs(p)
  tsu.gcs_utils = bucket_utils
  tsu._yanjax_s3 = True  # pylint: disable=protected-access


def orbax_atomicity(directory: epath.Path):
  """orbax AtomicityOptions for `directory`: a commit file on object stores, a rename on local disk."""
  from orbax.checkpoint import options  # pylint: disable=import-outside-toplevel
  if is_remote(directory):
    _teach_orbax_s3()
    return options.AtomicityOptions(mode=options.AtomicityMode.COMMIT_FILE)
  return None


# How tensorstore says ENOSPC / EDQUOT: the errno survives only in the message.
_DISK_FULL_MARKERS = ("No space left on device", "Disk quota exceeded", "os_error_code='28'",
                      "os_error_code='122'")


def is_disk_full(error: BaseException | None) -> bool:
  """Whether `error`, or an error it was raised from, is a full disk or quota (tensorstore, under orbax and
  zarr, reports it as a ValueError with the errno only in its message)."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(marker in str(error) for marker in _DISK_FULL_MARKERS):
      return True
    error = error.__cause__ or error.__context__
  return False
