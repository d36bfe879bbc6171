"""Every command answers --help with its help (exit 0) and one invalid value with one 'error:' line (exit 2,
no traceback): the guard of issue 23 for the whole class.

The commands are found, not listed: every module under yanjax/main/ plus the two outside it, so a new or
moved command is covered at once, and fails until INVALID gives it a bad command line.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import pytest
from test_train import REPO

OUTSIDE_MAIN = ("data_pipelines.prepare", "yanjax.numpy_runtime")
SUBCOMMANDS = {"yanjax.main.sweep": ("run", "launch", "fit")}
# One invalid command line per command; "{tmp}" is a fresh directory. A command missing here fails its test.
INVALID = {
    "yanjax.main.config_table": ["--configs_dir={tmp}/none"],
    "yanjax.main.evaluate": ["--workdir={tmp}/run", "--tasks=x", "--batch_size=0"],
    "yanjax.main.export": ["--workdir={tmp}/run", "--out={tmp}/export", "--dtype=float64"],
    "yanjax.main.fit": ["--results={tmp}/none.jsonl", "--out={tmp}/fit"],
    "yanjax.main.generate": ["--workdir={tmp}/run", "--prompt=x", "--top_p=1.5"],
    "yanjax.main.plan": ["--config=configs/yan_tiny.py", "--mfu=5"],
    "yanjax.main.summary": ["--config=configs/yan_tiny.py:nope"],
    "yanjax.main.sweep": ["run", "--spec=configs/sweeps/tiny.py", "--out={tmp}/sweep", "--only=99"],
    "yanjax.main.train": ["--config=configs/yan_tiny.py:nope", "--workdir={tmp}/train"],
    "data_pipelines.prepare": ["--output={tmp}/store", "--vocab_size=abc"],
    "yanjax.numpy_runtime": ["--export={tmp}/export", "--prompt=a", "--max_new_tokens=-3"],
}
PARALLEL = 4  # subprocesses at a time: each imports JAX (about 2 s of CPU)


def commands() -> list[str]:
  """Every command module: yanjax/main/*.py (but its __init__) and OUTSIDE_MAIN."""
  found = sorted(f"yanjax.main.{path.stem}" for path in (REPO / "yanjax/main").glob("*.py")
                 if not path.name.startswith("_"))
  return found + list(OUTSIDE_MAIN)


def _run(args: list[str]) -> tuple[int, str]:
  env = {key: value for key, value in os.environ.items() if key != "YANJAX_VERBOSE"}
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                        check=False, env=env)
  return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> dict[tuple[str, ...], tuple[int, str]]:
  """(module, "--help") / (module, subcommand, "--help") / (module, "invalid") -> (exit code, output), all run
  concurrently."""
  tmp = tmp_path_factory.mktemp("cli_guard")
  cases = {(module, "--help"): [module, "--help"] for module in commands()}
  cases.update({(module, sub, "--help"): [module, sub, "--help"] for module, subs in SUBCOMMANDS.items()
                for sub in subs})
  cases.update({(module, "invalid"): [module, *(arg.format(tmp=tmp) for arg in args)]
                for module, args in INVALID.items()})
  with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
    futures = {key: pool.submit(_run, args) for key, args in cases.items()}
    return {key: future.result() for key, future in futures.items()}


def test_commands_are_found():
  assert {"yanjax.main.train", "yanjax.main.generate", "yanjax.main.plan"} <= set(commands())


@pytest.mark.parametrize("module", commands())
def test_help_is_a_success(module, answers):
  for key in [(module, "--help")] + [(module, sub, "--help") for sub in SUBCOMMANDS.get(module, ())]:
    code, out = answers[key]
    assert code == 0 and "Traceback" not in out, (key, out[-2000:])
    assert "usage:" in out or "flags:" in out, (key, out[-2000:])


@pytest.mark.parametrize("module", commands())
def test_an_invalid_value_is_one_error_line(module, answers):
  assert module in INVALID, f"{module} is a command: give it an invalid command line in INVALID"
  code, out = answers[(module, "invalid")]
  assert code == 2, out[-2000:]
  assert "Traceback" not in out, out[-2000:]
  last = [line for line in out.splitlines() if line.strip()][-1]
  # ours: "error: ..."; argparse's own: "usage: ..." then "prog: error: ..."
  assert last.startswith("error: ") or ": error: " in last, out[-2000:]
