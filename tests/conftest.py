"""Test session set-up: 8 simulated CPU devices (sharding tests), a small prepared token store, a Ray cluster
that every test process joins, an S3 server (moto's, on 127.0.0.1), each started once per session, and one JAX
compilation cache that the session's trainer processes share (tests/test_train.py `tiny_flags`)."""

import contextlib
import fcntl
import os
import pathlib
import re
import sysconfig
import tempfile

# The tests' programs are tiny, so compiling them costs far more than running them: XLA's CPU backend skips its
# LLVM optimisation passes (the whole suite on 2 cores: 16m19s -> 13m22s). Set before JAX starts; the trainer
# processes the tests start inherit it, and every comparison is between programs compiled with the same setting
# (tests/test_router_balance.py, which asserts a training outcome, compiles as a user's run does).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import pytest  # noqa: E402
import s3_server  # noqa: E402

from yanjax.data import ray_local  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # before any backend starts; single-device code uses device 0
_SESSION = contextlib.ExitStack()
RAY_CPUS = 2
COMPILATION_CACHE_ENV = "YANJAX_TEST_COMPILATION_CACHE"


def pytest_configure(config):
  """The controlling process starts the session's Ray head and makes the compilation cache; xdist workers,
  started later, inherit RAY_ADDRESS and COMPILATION_CACHE_ENV."""
  if hasattr(config, "workerinput") or os.environ.get("RAY_ADDRESS"):
    return
  # Trainer processes of the same tiny model compile the same programs: each compiles once per session.
  os.environ[COMPILATION_CACHE_ENV] = _SESSION.enter_context(tempfile.TemporaryDirectory(prefix="jax-cache-"))
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny models' programs compile fast
  os.environ.update(ray_local.ENV)
  os.environ["RAY_ADDRESS"] = _SESSION.enter_context(ray_local.head_node(RAY_CPUS, object_store_bytes=500_000_000))


def pytest_unconfigure(config):
  del config
  _SESSION.close()


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> pathlib.Path:
  """A token store of 40 standard-library modules, vocabulary 512, prepared once per session: under
  pytest-xdist the first worker to ask prepares it in the session's shared temporary directory while the
  others wait on a lock (a store is published whole, so one that exists is complete)."""
  from data_pipelines import prepare  # pylint: disable=import-outside-toplevel
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # this session's, above every worker's own
  out = base / "small_store" / "stdlib40"
  with open(base / "small_store.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not out.exists():
      stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
      files = sorted(str(p) for p in stdlib.glob("*.py"))[:40]
      assert prepare.main(["--output", str(out), "--vocab_size", "512", "--validation_fraction", "0.2",
                           *files]) == 0
  return out


@pytest.fixture(scope="session")
def s3_endpoint():
  """The URL of a real S3-compatible server (moto) on 127.0.0.1; this process's AWS_* variables point at it."""
  with s3_server.moto_server() as endpoint:
    saved = dict(os.environ)
    s3_server.apply_environment(endpoint)
    yield endpoint
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def s3_bucket(s3_endpoint, request) -> str:
  """A new, empty bucket for one test: its s3:// URL."""
  name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + os.urandom(3).hex()
  return s3_server.create_bucket(s3_endpoint, name)


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory):
  """A 300-piece byte-fallback BPE sentencepiece model (bos 1, eos 2)."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  path = tmp_path_factory.mktemp("tok")
  text = "".join(f"the state of channel {i} decays slowly, café {i % 7}.\n" for i in range(300))
  (path / "corpus.txt").write_text(text, encoding="utf-8")
  spm.SentencePieceTrainer.train(input=str(path / "corpus.txt"), model_prefix=str(path / "tok"),
                                 vocab_size=300, byte_fallback=True, model_type="bpe", unk_id=0, bos_id=1,
                                 eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
  return path / "tok.model"
