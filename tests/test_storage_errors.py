"""Bad storage input to the trainer: one clear line naming the path and the fix, exit 2, before any compile.

One row per case: the workdir, environment changes, and a fragment of the expected message. The S3 cases run
against real moto servers on 127.0.0.1: the session's open one, and one that checks credentials and IAM
policies (for wrong credentials and a read-only bucket).
"""

import os
import subprocess
import sys

import pytest
import s3_server
from test_train import REPO, tiny_flags

from yanjax.core.cli import USAGE_EXIT_CODE

AUTH_BUCKET = "auth-checked"


@pytest.fixture(scope="module")
def auth_server():
  with s3_server.authenticated_moto_server(AUTH_BUCKET) as server:
    yield server


def _environment(env: dict[str, str | None]) -> dict[str, str]:
  environment = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true", "YANJAX_STORAGE_TIMEOUT_S": "30"}
  for key, value in env.items():
    if value is None:
      environment.pop(key, None)
    else:
      environment[key] = value
  return environment


def run_trainer(workdir: str, store, env: dict[str, str | None]):
  proc = subprocess.run([sys.executable, "-m", "yanjax.main.train", f"--workdir={workdir}", *tiny_flags(store)],
                        cwd=REPO, env=_environment(env), capture_output=True, text=True, timeout=180, check=False)
  return proc.returncode, proc.stdout, proc.stderr


def test_the_authenticated_server_accepts_its_writer(auth_server):
  """The control for the credential rows below: the same server and bucket take the writer's probe."""
  endpoint, writer, _ = auth_server
  probe = ("from yanjax.core import storage; "
           f"storage.check_writable(storage.as_path('s3://{AUTH_BUCKET}/ok'), 'workdir', 'fix it')")
  proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=_environment({"AWS_ENDPOINT_URL": endpoint,
                                                                                   **writer}),
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]


def _last_line(err: str) -> str:
  return [line for line in err.splitlines() if line.strip()][-1]


def _case_env(case, s3_endpoint, auth_server):
  endpoint, _, reader = auth_server
  closed_port = f"http://127.0.0.1:{s3_server.free_port()}"
  return {
      "typo_scheme": ("gcs://bucket/run", {}, "unknown storage scheme gcs://"),
      "one_slash": ("s3:/bucket/run", {}, "malformed URL"),
      "unreachable_endpoint": ("s3://any-bucket/run", {"AWS_ENDPOINT_URL": closed_port}, "cannot reach"),
      "missing_bucket": ("s3://no-such-bucket-here/run", {}, "does not exist"),
      "missing_credentials": ("s3://any-bucket/run", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                                                      "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                                                      "AWS_CONFIG_FILE": "/nonexistent"},
                              "no credentials found"),
      "wrong_credentials": (f"s3://{AUTH_BUCKET}/run", {"AWS_ENDPOINT_URL": endpoint,
                                                        "AWS_ACCESS_KEY_ID": "AKIAWRONGKEY",
                                                        "AWS_SECRET_ACCESS_KEY": "wrong"}, "rejected"),
      "read_only_bucket": (f"s3://{AUTH_BUCKET}/run", {"AWS_ENDPOINT_URL": endpoint, **reader},
                           "permission denied"),
  }[case]


@pytest.mark.parametrize("case", ["typo_scheme", "one_slash", "unreachable_endpoint", "missing_bucket",
                                  "missing_credentials", "wrong_credentials", "read_only_bucket"])
@pytest.mark.slow
def test_bad_storage_is_one_clear_line(case, s3_endpoint, auth_server, small_store):
  workdir, env, fragment = _case_env(case, s3_endpoint, auth_server)
  code, out, err = run_trainer(workdir, small_store, env)
  print(err[-2000:])
  assert code == USAGE_EXIT_CODE, err[-3000:]
  assert "Traceback" not in err
  line = _last_line(err)
  assert line.startswith("error: ") and fragment in line and workdir in line, line
  assert "compil" not in out  # refused before anything was compiled


@pytest.mark.parametrize("command,fragment", [
    (["yanjax.main.generate", "--workdir=gcs://bucket/run", "--prompt=a"], "unknown storage scheme gcs://"),
    (["yanjax.main.export", "--workdir=s3:/bucket/run", "--out=/tmp/unused-export"], "malformed URL"),
    (["yanjax.main.export", "--workdir=/nonexistent/run", "--out=/tmp/unused-export"], "no checkpoint under"),
    (["yanjax.numpy_runtime", "--export=/nonexistent/export", "--prompt=a"], "export directory missing"),
])
@pytest.mark.slow
def test_other_entry_points_report_bad_paths_in_one_line(command, fragment):
  proc = subprocess.run([sys.executable, "-m", *command], cwd=REPO, env=_environment({}), capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == USAGE_EXIT_CODE and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert _last_line(proc.stderr).startswith("error: ") and fragment in _last_line(proc.stderr)
