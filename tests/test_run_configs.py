"""Every shipped config is a whole run; bad run settings are refused at start-up with the key and the fix."""

import glob
import subprocess
import sys

import pytest
from test_train import REPO, tiny_flags

from yanjax.core.cli import USAGE_EXIT_CODE
from yanjax.core.config import ConfigError, load_config_file
from yanjax.model.config import ModelConfig
from yanjax.training.run_config import (
  DEFAULTS,
  REQUIRED,
  build_run_config,
  validate_run_config,
)

CONFIGS = sorted(glob.glob(str(REPO / "configs/yan_*.py")))
REQUIRED_KEYS = [f"{s}.{k}" for s, keys in DEFAULTS.items() if isinstance(keys, dict)
                 for k, v in keys.items() if v is REQUIRED]


@pytest.mark.parametrize("config", [f"{c}{v}" for c in CONFIGS
                                    for v in ("", ":selective", ":mcsd_dd", ":attention", ":hybrid")])
def test_every_config_is_a_whole_run(config):
  cfg = load_config_file(config)  # build_run_config refuses a config that leaves a REQUIRED key unset
  validate_run_config(cfg)
  assert cfg.train.steps > 0 and cfg.train.global_batch > 0 and cfg.train.seq_len > 0
  is_tiny = "yan_tiny" in config
  assert bool(cfg.train.default_workdir) == is_tiny  # --workdir is required except for yan_tiny
  assert cfg.data.prepare_default == is_tiny  # only yan_tiny prepares its own data


def test_the_paper_sizes_train_as_the_paper():
  for name in ("yan_1p6b", "yan_3b", "yan_10b"):
    cfg = load_config_file(REPO / f"configs/{name}.py")
    validate_run_config(cfg)
    assert (cfg.train.seq_len, cfg.train.global_batch, cfg.optimizer.lr) == (4096, 1152, 8e-4), name
    assert cfg.mesh.fsdp == -1, name  # FSDP over all devices


def test_a_config_that_leaves_a_size_dependent_key_unset_is_refused():
  assert {"train.global_batch", "train.seq_len", "train.steps", "optimizer.lr", "data.stores",
          "checkpoint.every_steps", "mesh.data"} <= set(REQUIRED_KEYS)
  with pytest.raises(ConfigError, match=r"does not set \['train.steps', 'train.global_batch'"):
    build_run_config(ModelConfig(), train=dict(seq_len=128), optimizer=dict(lr=1e-3, warmup_steps=1),
                     data=dict(stores=("s",)), mesh=dict(data=1, fsdp=1, tensor=1, expert=1),
                     checkpoint=dict(every_steps=10))


def test_a_negative_loss_chunk_is_refused_naming_the_key():
  cfg = load_config_file(REPO / "configs/yan_tiny.py")
  cfg.train.loss_chunk = -1
  with pytest.raises(ConfigError, match=r"^train\.loss_chunk=-1: must be an integer >= 0"):
    validate_run_config(cfg)


@pytest.mark.parametrize("extra,fragment", [
    (["--config.mesh.foo=2"], "--config.mesh.foo=2: mesh has no key 'foo'; its keys are data"),
    (["--config.train.global_batch=6", "--local_device_count=4"], "use a multiple of 4"),
    (["--config.train.tokens=100", "--config.train.steps=0"], "train.tokens=100: is smaller than one step"),
    (["--config.train.tokens=100000"], "set either train.steps or train.tokens"),
    (["--config.model.vocab_size=1024"], "has a vocabulary of 512 but the model expects 1024"),
    (["--config=configs/nope.py"], "config file configs/nope.py does not exist"),
    (["--config.evaluate.every=3"], "evaluate.tasks=(): evaluate.every=3: set both the tasks"),
    (["--config.evaluate.every=3", "--config.evaluate.tasks=('nope.yaml',)"], "task file nope.yaml does not exist"),
    (["--config.model.pattern=('mcsd', 'swa')", "--config.model.window=4096"],
     "model.window=4096: the sliding window must be <= train.seq_len="),
    (["--config.model.pattern=('mcsd', 'rwkv')"], "model.pattern=('mcsd', 'rwkv'): names unknown mixer(s) ['rwkv']"),
    (["--config.model.pattern=('mcsd', 'mcsd', 'swa')"], "its length 3 must divide model.layers=2"),
])
@pytest.mark.slow
def test_bad_run_settings_are_one_line_at_start_up(small_store, tmp_path, extra, fragment):
  proc = subprocess.run([sys.executable, "-m", "yanjax.main.train", f"--workdir={tmp_path / 'w'}",
                         *tiny_flags(small_store), *extra], cwd=REPO, capture_output=True, text=True, timeout=180,
                        check=False)
  assert proc.returncode == USAGE_EXIT_CODE, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "train:" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and fragment in last, last


def test_workdir_is_required_except_for_yan_tiny(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "yanjax.main.train", "--config=configs/yan_20m.py"], cwd=REPO,
                        capture_output=True, text=True, timeout=180, check=False)
  assert proc.returncode == USAGE_EXIT_CODE
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --workdir is required for this config")
