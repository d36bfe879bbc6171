"""Test session set-up: 8 simulated CPU devices (sharding tests), and a small prepared token store."""

import pathlib
import sysconfig

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)  # before any backend starts; single-device code uses device 0


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> pathlib.Path:
  """A token store of 40 standard-library modules, vocabulary 512 (prepared once per session)."""
  from data_pipelines import prepare  # pylint: disable=import-outside-toplevel
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(str(p) for p in stdlib.glob("*.py"))[:40]
  out = tmp_path_factory.mktemp("store") / "stdlib40"
  assert prepare.main(["--output", str(out), "--vocab_size", "512", "--validation_fraction", "0.2", *files]) == 0
  return out
