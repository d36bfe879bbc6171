"""Configs: every file loads, invalid values fail naming the key, parameter counts equal the formula."""

import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx

from yanjax.core.config import ConfigError, load_config_file
from yanjax.main.config_table import config_rows
from yanjax.main.config_table import main as print_table
from yanjax.model.config import ModelConfig
from yanjax.model.counting import flops_per_token, param_count
from yanjax.model.lm import LanguageModel
from yanjax.training.presets import matched_attention

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("changes,key", [
    (dict(width=130, channels=4), "channels"),
    (dict(router=True, groups=4, top_k=5), "top_k"),
    (dict(recurrence="fft"), "recurrence"),
    (dict(combine="mean"), "combine"),
    (dict(mixer="attention", width=128, heads=3), "heads"),
    (dict(router=True, mlp_width=100, groups=8), "groups"),
    (dict(layers=0), "layers"),
    (dict(dtype="float16"), "dtype"),
])
def test_invalid_config_names_the_key(changes, key):
  with pytest.raises(ConfigError, match=rf"model\.{key}="):
    ModelConfig(**changes)


@pytest.mark.parametrize("arch,mixer", [("yan", "mcsd"), ("attention", "attention")])
def test_the_old_arch_key_is_rejected_naming_its_new_name(arch, mixer):
  """A config, or one read back from a checkpoint written before the rename, that still says `arch`."""
  message = f"model.arch was renamed: use model.mixer='{mixer}' (was arch='{arch}')"
  with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
    ModelConfig.from_dict({"arch": arch, "width": 64})
  with pytest.raises(ConfigError, match=re.escape(message)):
    ModelConfig().replace(arch=arch)


def test_unknown_key_is_rejected_with_its_name():
  with pytest.raises(ConfigError, match="chanels"):
    ModelConfig.from_dict({"width": 64, "chanels": 4})


def test_missing_config_file_and_unknown_variant():
  with pytest.raises(ConfigError, match="does not exist"):
    load_config_file("configs/nope.py")
  with pytest.raises(ConfigError, match="unknown config variant"):
    load_config_file(f"{CONFIGS / 'yan_tiny.py'}:moe")


def test_every_config_loads_and_the_table_prints(capsys):
  rows = list(config_rows(CONFIGS, 4096))
  names = {spec.split("/")[-1] for spec, *_ in rows}
  for size in ("yan_tiny", "yan_20m", "yan_85m", "yan_350m", "yan_1p6b", "yan_3b", "yan_10b"):
    assert {f"{size}.py", f"{size}.py:selective", f"{size}.py:attention"} <= names
  paper = {spec.split("/")[-1]: cfg for spec, cfg, *_ in rows}
  for name, layers, width, channels in (("yan_1p6b", 12, 2560, 10), ("yan_3b", 20, 2560, 10),
                                        ("yan_10b", 60, 3072, 12)):
    cfg = paper[f"{name}.py"]
    assert (cfg.layers, cfg.width, cfg.channels, cfg.channel_width) == (layers, width, channels, 256)
  print_table(["--configs_dir", str(CONFIGS)])
  assert "yan_10b.py:attention" in capsys.readouterr().out


@pytest.mark.parametrize("changes", [
    dict(mixer="mcsd"),
    dict(mixer="mcsd", combine="sum", learnable_rates=True, tie_embeddings=False),
    dict(mixer="mcsd", router=True, groups=4, top_k=2),
    dict(mixer="mcsd", scan_layers=True),
    dict(mixer="attention"),
])
def test_param_count_equals_the_instantiated_model(changes):
  cfg = ModelConfig(vocab_size=50, width=32, layers=3, channels=4, heads=2, mlp_width=64, **changes)
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  actual = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  count = param_count(cfg)
  print(changes, "model", actual, "formula", count)
  assert count.total == actual
  if cfg.router:
    group = 3 * cfg.width * cfg.group_width
    assert count.total - count.active == cfg.layers * (cfg.groups - cfg.top_k) * group
  else:
    assert count.active == count.total


def test_flops_formula():
  yan = ModelConfig(vocab_size=100, width=64, layers=2, channels=4, mlp_width=128)
  n = param_count(yan).matmul_active
  assert n == 100 * 64 + 2 * (4 * 4 * 16 * 16 + 2 * 64 * 64 + 3 * 64 * 128)
  assert flops_per_token(yan, 512) == flops_per_token(yan, 8192) == 6 * n + 12 * 2 * 128
  att = yan.replace(mixer="attention", heads=4)
  assert flops_per_token(att, 1024) - flops_per_token(att, 512) == 12 * 2 * 512 * 64


def test_matched_attention_is_within_one_percent():
  for path in sorted(CONFIGS.glob("yan_*.py")):
    cfg = ModelConfig.from_dict(load_config_file(path).model)
    base = matched_attention(cfg)
    ratio = param_count(base).total / param_count(cfg).total
    print(path.name, f"{ratio:.4f}")
    assert abs(ratio - 1) < 0.01 and (base.width, base.layers) == (cfg.width, cfg.layers)
