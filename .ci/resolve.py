"""Checks (or rewrites) constraints.txt, the lock that README's install commands resolve against.

    python .ci/resolve.py check    # .ci/run: a fresh venv resolves `.[test]` with the lock, fast, no backtracking
    python .ci/resolve.py update   # after changing dependencies: resolve afresh and rewrite constraints.txt

CI runs where the packages are already installed, so it cannot see pip's resolver backtracking for half an hour
on a new machine (as it did over boto3 / botocore). `check` resolves README command 2 into a new virtual
environment under a time limit (a dry run: metadata only, nothing installed) and fails when pip backtracks,
when the resolution takes longer than the limit, or when it picks a package the lock does not pin at that
version (a dependency added without `update`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"
TARGET = ".[test]"  # README command 2; command 1 (`.`) resolves a subset of it
BACKTRACKING = "pip is looking at multiple versions of"
LOCK_HEADER = ("# The versions README's install commands use (`pip install -e ... -c constraints.txt`):\n"
               "# one resolution of `.[test]` for Python 3.11 on Linux, checked in .ci/run by\n"
               "# `python .ci/resolve.py check`. After changing dependencies in pyproject.toml, regenerate it:\n"
               "# python .ci/resolve.py update\n")


def resolve(with_lock: bool, limit_s: float) -> tuple[dict[str, str], str, float]:
  """Resolves TARGET into a new venv: ({name: version}, pip's log, seconds). Exits 1 on failure or timeout."""
  with tempfile.TemporaryDirectory(prefix="resolve-") as temp:
    venv = pathlib.Path(temp) / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    report = pathlib.Path(temp) / "report.json"
    command = [str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--ignore-installed",
               "--disable-pip-version-check", "--report", str(report), "-e", TARGET]
    if with_lock:
      command += ["-c", str(LOCK)]
    start = time.monotonic()
    try:
      proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit_s, check=False)
    except subprocess.TimeoutExpired as e:
      fail(f"resolving {TARGET} took over {limit_s:.0f} s (pip backtracking?); last output: {tail(e.stdout)}")
    seconds = time.monotonic() - start
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
      fail(f"resolving {TARGET} failed (pip exit {proc.returncode}): {tail(log)}")
    installs = json.loads(report.read_text())["install"]
  pins = {normalize(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}
  pins.pop("yanjax", None)
  return pins, log, seconds


def read_lock() -> dict[str, str]:
  pins = {}
  for line in LOCK.read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      name, _, version = line.partition("==")
      pins[normalize(name)] = version.strip()
  return pins


def check(limit_s: float) -> None:
  pins, log, seconds = resolve(with_lock=True, limit_s=limit_s)
  if BACKTRACKING in log:
    fail(f"pip backtracked resolving {TARGET} with {LOCK.name}: "
         f"{next(line for line in log.splitlines() if BACKTRACKING in line).strip()}")
  locked = read_lock()
  loose = sorted(f"{name}=={version}" for name, version in pins.items() if locked.get(name) != version)
  if loose:
    fail(f"{LOCK.name} does not pin {', '.join(loose)}: run `python .ci/resolve.py update` and commit the lock")
  print(f"resolve: {TARGET} resolved with {LOCK.name} into a new venv in {seconds:.1f} s, {len(pins)} packages, "
        "all pinned, no backtracking")


def update(limit_s: float) -> None:
  pins, log, seconds = resolve(with_lock=False, limit_s=limit_s)
  if BACKTRACKING in log:
    print(f"warning: pip backtracked resolving {TARGET} without a lock ({seconds:.0f} s); consider tighter bounds "
          "in pyproject.toml", file=sys.stderr)
  LOCK.write_text(LOCK_HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
  print(f"resolve: wrote {len(pins)} pins to {LOCK} ({seconds:.1f} s)")


def normalize(name: str) -> str:
  """A project name as PEP 503 compares it."""
  return re.sub(r"[-_.]+", "-", name).lower()


def tail(text: str | bytes | None, lines: int = 5) -> str:
  text = text.decode(errors="replace") if isinstance(text, bytes) else (text or "")
  return " | ".join(line.strip() for line in text.splitlines()[-lines:])


def fail(message: str):
  print(f"resolve: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("mode", choices=("check", "update"))
  parser.add_argument("--limit_s", type=float, default=180.0, help="fail when resolving takes longer")
  args = parser.parse_args()
  (check if args.mode == "check" else update)(args.limit_s)


if __name__ == "__main__":
  main()
