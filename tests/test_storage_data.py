"""Token stores in an S3 bucket (a real moto server): prepare, open and load equal the local store;
overwrite, untrusted stores and a missing bucket."""

import os
import pathlib
import sysconfig

import boto3
import botocore.exceptions
import numpy as np
import pytest
from etils import epath

from data_pipelines import prepare
from yanjax.core import storage
from yanjax.data.errors import StoreError
from yanjax.data.loader import make_loader
from yanjax.data.store import open_store

FILES = sorted(str(p) for p in pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:6]
SETTINGS = ["--vocab_size", "512", "--validation_fraction", "0.2", "--no_progress"]


def prepare_store(output: str, *extra: str) -> int:
  return prepare.main(["--output", output, *SETTINGS, *extra, *FILES])


def object_keys(url: str) -> list[str]:
  """Every object key in the bucket of `url`."""
  bucket = url.split("://", 1)[1].split("/")[0]
  client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
  return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
  out = tmp_path_factory.mktemp("local") / "store"
  assert prepare_store(str(out)) == 0
  return open_store(out)


def test_s3_store_equals_local_store(s3_bucket, local_store, capsys):
  url = f"{s3_bucket}/stores/x"
  assert prepare_store(url) == 0
  remote = open_store(url)
  assert os.fspath(remote.path) == url and storage.is_remote(remote.tokenizer_path)
  del remote.metadata["preparation"], local_store.metadata["preparation"]  # how long, on which workers
  assert remote.metadata == local_store.metadata
  assert remote.tokenizer_bytes() == local_store.tokenizer_bytes()
  assert remote.tokenizer().encode("def f(): pass") == local_store.tokenizer().encode("def f(): pass")
  for split in ("train", "validation"):
    here, there = local_store.split(split), remote.split(split)
    np.testing.assert_array_equal(there.tokens.read().result(), here.tokens.read().result())
    np.testing.assert_array_equal(there.doc_offsets, here.doc_offsets)
  assert not any(".tmp-" in key or "probe" in key for key in object_keys(url))
  capsys.readouterr()
  assert prepare_store(url) == 0 and "up to date" in capsys.readouterr().out  # fingerprint read from S3

  for packing, memory in ((True, 1 << 30), (True, 0), (False, 0)):  # in memory, and read window by window
    kwargs = dict(seq_len=32, global_batch=4, seed=1, packing=packing, max_in_memory_bytes=memory)
    here, there = make_loader([local_store.path], **kwargs), make_loader([url], **kwargs)
    for step in range(3):
      expected, got = here.batch(step), there.batch(step)
      for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
  assert there.tokenizer_bytes() == local_store.tokenizer_bytes()

  reused = f"{s3_bucket}/stores/reused"  # --tokenizer_model from a bucket
  assert prepare_store(reused, "--tokenizer_model", f"{url}/tokenizer.model") == 0
  assert open_store(reused).tokenizer_sha256 == remote.tokenizer_sha256


def test_overwrite_replaces_s3_store_metadata_first(s3_bucket, capsys, monkeypatch):
  url = f"{s3_bucket}/stores/x"
  assert prepare_store(url) == 0
  capsys.readouterr()
  assert prepare_store(url, "--seed", "1") == 2
  assert "--overwrite" in capsys.readouterr().err
  copied, old_metadata_seen = [], []
  fs = epath.backend.fsspec_backend.fs(url)  # fsspec's cached instance: the one yanjax.core.storage copies with
  copy = fs.copy

  def spy(path1, path2, **kwargs):
    fs.invalidate_cache()
    old_metadata_seen.append(fs.exists(f"{url[len('s3://'):]}/metadata.json"))
    copied.extend([path1] if isinstance(path1, str) else path1)
    return copy(path1, path2, **kwargs)

  monkeypatch.setattr(fs, "copy", spy)
  assert prepare_store(url, "--seed", "1", "--overwrite") == 0
  assert copied[-1].endswith("/metadata.json") and not any(old_metadata_seen)
  assert open_store(url).metadata["settings"]["seed"] == 1
  assert not any(".tmp-" in key for key in object_keys(url))


def test_s3_store_without_metadata_is_refused(s3_bucket, capsys):
  url = f"{s3_bucket}/stores/x"
  assert prepare_store(url) == 0
  storage.as_path(f"{url}/metadata.json").unlink()
  with pytest.raises(StoreError, match=f"{url} has no complete metadata.json"):
    open_store(url)
  with pytest.raises(StoreError, match="no complete metadata.json"):
    make_loader([url], seq_len=8, global_batch=2)
  capsys.readouterr()
  assert prepare_store(url) == 2 and "not a trusted store" in capsys.readouterr().err
  with pytest.raises(StoreError, match="no prepared store"):
    open_store(f"{s3_bucket}/stores/never")


def test_missing_bucket_and_bad_urls_are_one_clear_line(s3_endpoint, capsys):
  url = "s3://yanjax-no-such-bucket/stores/x"
  with pytest.raises(StoreError, match="bucket 'yanjax-no-such-bucket' does not exist") as error:
    open_store(url)
  assert url in str(error.value) and "\n" not in str(error.value)
  for output, reason in ((url, "does not exist"), ("gcs://b/x", "unknown storage scheme"),
                         ("s3:/b/x", "malformed URL")):
    capsys.readouterr()
    assert prepare_store(output) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --output {output}" if reason == "does not exist" else "error: ")
    assert output in line and reason in line
  client = boto3.client("s3", endpoint_url=s3_endpoint)
  with pytest.raises(botocore.exceptions.ClientError):  # the probe created no bucket
    client.head_bucket(Bucket="yanjax-no-such-bucket")
