"""A real S3-compatible server for the tests: moto's standalone server on 127.0.0.1, one per test session."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
  with contextlib.closing(socket.socket()) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def moto_server():
  """Yields the endpoint URL of a running moto S3 server; stops it afterwards."""
  port = free_port()
  proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  endpoint = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 60
    while True:
      try:
        urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)  # pylint: disable=consider-using-with
        break
      except OSError:
        if proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"moto server did not start on {endpoint}") from None
        time.sleep(0.2)
    yield endpoint
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def s3_environment(endpoint: str) -> dict[str, str]:
  """The variables that point boto3, s3fs, tensorstore (through yanjax.storage) and orbax at `endpoint`."""
  return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


def create_bucket(endpoint: str, name: str) -> str:
  import boto3  # pylint: disable=import-outside-toplevel
  boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in CREDENTIALS.items()
                                               if k.startswith("AWS_") and "KEY" in k},
               region_name="us-east-1").create_bucket(Bucket=name)
  return f"s3://{name}"


def apply_environment(endpoint: str) -> None:
  os.environ.update(s3_environment(endpoint))
