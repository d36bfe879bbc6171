"""Processes started from a process that runs JAX: never by fork (JAX's threads make a forked child deadlock).

Data preparation starts a local Ray when no cluster is given; the trainer calls it (README command 1) after JAX
has started its threads. A control fork in the same process shows that the warning would be seen.
"""

import os
import subprocess
import sys
import sysconfig

import pytest
from test_train import REPO

PROBE = """
import subprocess, sys, warnings
warnings.simplefilter("always")
import jax
jax.devices()  # JAX's backend and its threads are up from here on
from yanjax.data.prepare import PrepareSettings, prepare_store
prepare_store(PrepareSettings(output=sys.argv[1], inputs=sys.argv[2:], vocab_size=512, progress=False))
print("== prepared ==", file=sys.stderr, flush=True)
subprocess.run(["true"], preexec_fn=lambda: None, check=True)  # the control: a fork that runs Python's at-fork hooks
"""
FORK_WARNING = "os.fork() was called"


@pytest.mark.slow
def test_local_preparation_in_a_jax_process_never_forks(tmp_path):
  files = sorted(str(p) for p in (os.path.join(sysconfig.get_paths()["stdlib"], n) for n in ("abc.py", "bisect.py",
                                                                                            "colorsys.py")))
  env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray, as on a laptop
  proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "store"), *files], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  preparation, control = proc.stderr.split("== prepared ==")
  assert FORK_WARNING not in preparation, preparation[-3000:]
  assert FORK_WARNING in control, control
  assert (tmp_path / "store" / "metadata.json").exists()
