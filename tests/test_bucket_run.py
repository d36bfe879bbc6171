"""A whole run with a bucket as the only storage, against a real S3 server (moto) on 127.0.0.1.

Prepare a token store into the bucket, train with checkpoints into it, SIGKILL, resume (losses and final
parameters identical to an uninterrupted run), generate, export into the bucket, and run the export with the
NumPy runtime reading it from the bucket.
"""

import json
import re
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest
from etils import epath
from test_train import REPO, start_train, tiny_flags

from yanjax.core import storage

KILL_AFTER = 8


def _run(args, timeout=300):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _losses(workdir: str) -> dict[int, float]:
  records = [json.loads(line) for line in epath.Path(f"{workdir}/metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in records if "loss" in r]
  assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def _final_params(workdir: str) -> dict[str, np.ndarray]:
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from yanjax.inference.loading import load_inference_model  # pylint: disable=import-outside-toplevel
  model, _, _ = load_inference_model(workdir)
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.slow
def test_a_run_that_lives_in_a_bucket(s3_bucket, tmp_path):
  stdlib = sorted(str(p) for p in epath.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
  store = f"{s3_bucket}/stores/stdlib40"
  _run(["data_pipelines.prepare", "--output", store, "--vocab_size", "512", "--validation_fraction", "0.2",
        *stdlib])
  flags = tiny_flags(store, steps=24, shared_cache=False, eval_every=100) + ["--config.checkpoint.every_steps=8",
                                                          "--config.train.sample_tokens=8"]
  straight, killed = f"{s3_bucket}/runs/straight", f"{s3_bucket}/runs/killed"
  _run(["yanjax.main.train", f"--workdir={straight}", *flags])

  proc = start_train(killed, flags)
  committed = storage.as_path(f"{killed}/checkpoints/{KILL_AFTER}/commit_success.txt")
  deadline = time.time() + 240
  while not committed.exists():
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    epath.backend.fsspec_backend.fs(killed).invalidate_cache()
    time.sleep(0.2)
  proc.kill()
  proc.wait()
  resumed_out = _run(["yanjax.main.train", f"--workdir={killed}", *flags])
  assert "resumed from the checkpoint at step" in resumed_out
  assert re.search(r"compilation cache s3://\S+: [1-9]\d* hits", resumed_out), resumed_out[-2000:]

  assert _losses(straight) == _losses(killed)  # bitwise, each of the 24 steps once
  assert sorted(_losses(killed)) == list(range(1, 25))
  a, b = _final_params(straight), _final_params(killed)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  for name in ("config.json", "tokenizer.model", "sample.txt"):
    assert storage.as_path(f"{killed}/{name}").exists(), name
  assert any(storage.as_path(f"{killed}/tensorboard").iterdir())
  assert any(storage.as_path(f"{killed}/compilation_cache").iterdir())

  generated = _run(["yanjax.main.generate", f"--workdir={killed}", "--prompt", "def ", "--max_new_tokens", "8"])
  assert generated.strip()
  export = f"{s3_bucket}/exports/killed"
  _run(["yanjax.main.export", f"--workdir={killed}", f"--out={export}"])
  assert storage.as_path(f"{export}/manifest.json").exists()
  numpy_text = _run(["yanjax.numpy_runtime", f"--export={export}", "--prompt", "def ", "--max_new_tokens", "8"])
  assert numpy_text.strip()
