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
from yanjax.training.presets import HYBRID_PATTERN, model_variant

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("changes,key", [
    (dict(width=130, channels=4), "channels"),
    (dict(router=True, groups=4, top_k=5), "top_k"),
    (dict(recurrence="fft"), "recurrence"),
    (dict(combine="mean"), "combine"),
    (dict(pattern=("attention",), width=128, heads=3), "heads"),
    (dict(router=True, mlp_width=100, groups=8), "groups"),
    (dict(layers=0), "layers"),
    (dict(dtype="float16"), "dtype"),
])
def test_invalid_config_names_the_key(changes, key):
  with pytest.raises(ConfigError, match=rf"model\.{key}="):
    ModelConfig(**changes)


@pytest.mark.parametrize("key,value,mixer", [("arch", "yan", "mcsd"), ("arch", "attention", "attention"),
                                              ("mixer", "mcsd_dd", "mcsd_dd")])
def test_the_old_mixer_keys_are_rejected_naming_the_pattern(key, value, mixer):
  """A config, or one read back from a checkpoint written before the renames, that still says `arch` or `mixer`."""
  message = (f"model.{key} was renamed: use model.pattern=('{mixer}',) (a uniform model is a pattern of one; "
             f"was {key}='{value}')")
  with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
    ModelConfig.from_dict({key: value, "width": 64})
  with pytest.raises(ConfigError, match=re.escape(message)):
    ModelConfig().replace(**{key: value})


@pytest.mark.parametrize("pattern,layers,why", [
    (("mcsd", "mcsd", "attention"), 4,
     "model.pattern=('mcsd', 'mcsd', 'attention'): its length 3 must divide model.layers=4"),
    (("mcsd", "gru"), 2, "model.pattern=('mcsd', 'gru'): names unknown mixer(s) ['gru']; each must be one of"),
    ((), 2, "model.pattern=(): must be a non-empty tuple of mixer names"),
    ("mcsd", 2, "model.pattern='mcsd': must be a non-empty tuple of mixer names"),
])
def test_a_bad_pattern_is_one_line_naming_it(pattern, layers, why):
  with pytest.raises(ConfigError, match=f"^{re.escape(why)}"):
    ModelConfig(pattern=pattern, layers=layers)


def test_unknown_key_is_rejected_with_its_name():
  with pytest.raises(ConfigError, match="chanels"):
    ModelConfig.from_dict({"width": 64, "chanels": 4})


def test_a_saved_model_takes_this_machines_kernels():
  """A run trained with cuDNN attention, tokamax's grouped matmul and the Pallas recurrence is read back on this
  CPU (inference, a resume's shape check) with each kernel choice at "auto"; what it computes is unchanged."""
  trained = dict(pattern=("swa", "mcsd"), dtype="bfloat16", router=True, dispatch="dropless",
                 recurrence="pallas", attention_kernel="cudnn", grouped_matmul="tokamax", width=64, heads=2)
  cfg = ModelConfig.saved(trained)
  assert (cfg.recurrence, cfg.attention_kernel, cfg.grouped_matmul) == ("auto", "auto", "auto")
  assert (cfg.pattern, cfg.dtype, cfg.dispatch, cfg.width) == (("swa", "mcsd"), "bfloat16", "dropless", 64)


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
    dict(pattern=("mcsd",)),
    dict(pattern=("mcsd",), combine="sum", learnable_rates=True, tie_embeddings=False),
    dict(pattern=("mcsd",), router=True, groups=4, top_k=2),
    dict(pattern=("mcsd",), scan_layers=True),
    dict(pattern=("attention",)),
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
  att = yan.replace(pattern=("attention",), heads=4)
  assert flops_per_token(att, 1024) - flops_per_token(att, 512) == 12 * 2 * 512 * 64


@pytest.mark.parametrize("variant,pattern", [("attention", ("attention",)), ("hybrid", HYBRID_PATTERN)])
def test_the_attention_and_hybrid_variants_match_the_parameters_within_one_percent(variant, pattern):
  for path in sorted(CONFIGS.glob("yan_*.py")):
    run = load_config_file(path)
    cfg = ModelConfig.from_dict(run.model)
    other = model_variant(cfg.to_dict(), variant, run.train.seq_len)
    ratio = param_count(other).total / param_count(cfg).total
    print(path.name, variant, f"{ratio:.4f}")
    assert abs(ratio - 1) < 0.01 and (other.width, other.layers) == (cfg.width, cfg.layers)
    assert other.pattern == pattern and ("swa" not in pattern or other.window == min(1024, run.train.seq_len))
