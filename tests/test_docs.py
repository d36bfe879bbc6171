"""The code in the docs runs: every Python example in README.md, launch/README.md and docs/*.md is run as
written (in a directory where README command 1's run exists), an example that quotes a file (first line
`# path/to/file.py ...`) must still be in that file, and every shell example names modules, scripts and config
files that exist."""

import importlib.util
import re
import subprocess
import sys

import pytest
from model_helpers import random_model, small_config
from test_train import REPO

from yanjax.export.writer import export_model

DOCS = [REPO / "README.md", REPO / "launch/README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
QUOTE = re.compile(r"^# ([\w/.-]+\.py)\b")


def blocks(language: str) -> list[tuple[str, str]]:
  """(id "file:line", text) of every fenced block of `language` in DOCS."""
  found = []
  for doc in DOCS:
    text = doc.read_text()
    for match in FENCE.finditer(text):
      if match.group(1) == language:
        found.append((f"{doc.relative_to(REPO)}:{text[:match.start()].count(chr(10)) + 1}", match.group(2)))
  return found


EXAMPLES = [(where, code) for where, code in blocks("python") if not QUOTE.match(code)]
QUOTES = [(where, code) for where, code in blocks("python") if QUOTE.match(code)]
SHELL = blocks("bash")


@pytest.fixture(scope="module")
def readme_run_dir(small_store, tmp_path_factory):
  """A directory laid out as after README command 1 (its store under runs/yan_tiny/data/stdlib), with the export
  docs/export.md's examples read (exports/tiny, written with --onnx; a small random model)."""
  root = tmp_path_factory.mktemp("docs")
  (root / "runs/yan_tiny/data").mkdir(parents=True)
  (root / "runs/yan_tiny/data/stdlib").symlink_to(small_store)
  export_model(random_model(small_config()), small_config(), root / "exports/tiny", onnx=True)
  return root


@pytest.mark.parametrize("where,code", EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_python_example_runs(where, code, readme_run_dir):
  proc = subprocess.run([sys.executable, "-c", code], cwd=readme_run_dir, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, f"the example at {where} fails:\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("where,code", QUOTES, ids=[where for where, _ in QUOTES])
def test_quoted_code_is_still_in_its_file(where, code):
  path = REPO / QUOTE.match(code).group(1)
  quoted = code.split("\n", 1)[1]
  assert path.exists() and quoted in path.read_text(), f"{where} quotes {path.name}, which no longer has:\n{quoted}"


def test_there_are_examples_to_check():
  assert EXAMPLES and QUOTES and len(SHELL) >= 10


@pytest.mark.parametrize("where,script", SHELL, ids=[where for where, _ in SHELL])
def test_shell_example_names_what_exists(where, script):
  """`python -m MODULE`, `python path.py`, `--config FILE.py[:variant]` and `--spec FILE.py` name real things
  (paths relative to the repository; ones with placeholders such as <...> or $VAR are not checked)."""
  missing = [module for module in re.findall(r"python3? -m ([\w.]+)", script)
             if importlib.util.find_spec(module) is None]
  paths = re.findall(r"python3? ([\w/.-]+\.py)\b", script) + re.findall(r"--(?:config|spec)[= ]([\w/.-]+\.py)", script)
  missing += [path for path in paths if not (REPO / path).exists()]
  assert not missing, f"{where} names what does not exist: {missing}"
