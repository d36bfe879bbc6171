"""A real S3-compatible server for the tests: moto's standalone server on 127.0.0.1, one per test session."""

from __future__ import annotations

import contextlib
import json
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
def moto_server(env: dict[str, str] | None = None):
  """Yields the endpoint URL of a running moto S3 server; stops it afterwards."""
  with moto_process(env) as (endpoint, _):
    yield endpoint


@contextlib.contextmanager
def moto_process(env: dict[str, str] | None = None):
  """Yields (endpoint URL, process) of a running moto S3 server, for tests that kill it (a store that dies);
  stops it afterwards if it still runs."""
  port = free_port()
  proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
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
    yield endpoint, proc
  finally:
    proc.terminate()
    proc.wait(timeout=30)


_IAM_SETUP_REQUESTS = 6  # the unauthenticated requests `authenticated_moto_server` makes before auth is on


@contextlib.contextmanager
def authenticated_moto_server(bucket: str):
  """A moto server that checks credentials and IAM policies; yields (endpoint, read-write keys, read-only
  keys), each keys a dict of AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, with `bucket` created."""
  import boto3  # pylint: disable=import-outside-toplevel
  with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": str(_IAM_SETUP_REQUESTS)}) as endpoint:
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    keys = {}
    for user, actions in (("writer", ["s3:*"]), ("reader", ["s3:GetObject", "s3:ListBucket"])):
      iam.create_user(UserName=user)
      key = iam.create_access_key(UserName=user)["AccessKey"]
      iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps({
          "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
      keys[user] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id=keys["writer"]["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=keys["writer"]["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
    yield endpoint, keys["writer"], keys["reader"]


def s3_environment(endpoint: str) -> dict[str, str]:
  """The variables that point boto3, s3fs, tensorstore (through yanjax.core.storage) and orbax at `endpoint`."""
  return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


def create_bucket(endpoint: str, name: str) -> str:
  import boto3  # pylint: disable=import-outside-toplevel
  boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in CREDENTIALS.items()
                                               if k.startswith("AWS_") and "KEY" in k},
               region_name="us-east-1").create_bucket(Bucket=name)
  return f"s3://{name}"


def apply_environment(endpoint: str) -> None:
  os.environ.update(s3_environment(endpoint))
