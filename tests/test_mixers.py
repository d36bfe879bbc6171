"""The mixer registry is the single source: every registered mixer is allowed by the config and the export,
counts, lays out and runs the way its entry says, and is called the same way in JAX and in NumPy."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from yanjax.core.config import ConfigError
from yanjax.model.config import ModelConfig
from yanjax.model.layers import BlockInputs
from yanjax.model.mixers import MIXERS
from yanjax.numpy_runtime import TWINS, ExportError
from yanjax.numpy_runtime import layers as np_layers
from yanjax.numpy_runtime.format import check_config

# Changes that every mixer must accept (a mixer ignores the keys of others).
VARIANTS = {"default": {}, "sum_current_learned": dict(combine="sum", include_current=True, learnable_rates=True)}


def _config(name, variant="default"):
  return ModelConfig(pattern=(name,), vocab_size=50, width=32, layers=2, channels=4, heads=2, mlp_width=64,
                     max_decode_len=16, **VARIANTS[variant])


def test_the_config_and_the_export_allow_exactly_the_registered_mixers():
  assert list(MIXERS) == list(TWINS)  # the JAX registry and the NumPy runtime's name the same mixers
  assert {_config(name).pattern for name in MIXERS} == {(name,) for name in MIXERS}
  with pytest.raises(ConfigError, match=re.escape(
      f"model.pattern=('mcsd', 'rwkv'): names unknown mixer(s) ['rwkv']; each must be one of {tuple(TWINS)}")):
    _config("mcsd").replace(pattern=("mcsd", "rwkv"))
  with pytest.raises(ExportError, match=re.escape(
      f"config pattern=['rwkv'] must be a non-empty list of mixer names from {tuple(TWINS)}")):
    check_config({**_config("mcsd").to_dict(), "pattern": ["rwkv"]})


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(MIXERS))
def test_registered_shapes_and_params_are_the_modules(name, variant):
  cfg = _config(name, variant)
  twin, c = TWINS[name], cfg.to_dict()
  module = MIXERS[name](cfg, rngs=nnx.Rngs(0))
  shapes = {".".join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
  print(name, variant, shapes)
  assert shapes == twin.shapes(c)
  total, matmul = twin.params(c)
  assert total == sum(int(np.prod(s)) for s in shapes.values()) and 0 < matmul <= total


@pytest.mark.parametrize("name", list(MIXERS))
def test_every_mixer_is_called_the_same_way_and_its_twin_agrees(name):
  """module(x, inputs[, cache]) and twin(x, inputs[, state]) on the same weights: one document per row, with
  and without a decode cache."""
  cfg = _config(name)
  module = MIXERS[name](cfg, rngs=nnx.Rngs(0))
  b, t = 2, 7
  x = jax.random.normal(jax.random.PRNGKey(1), (b, t, cfg.width))
  reset, segment_ids = np.zeros((b, t), bool), np.ones((b, t), np.int32)
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  y, _ = module(x, BlockInputs(*map(jnp.asarray, (reset, segment_ids, positions)), None))
  y_cached, _ = module(x, BlockInputs(*map(jnp.asarray, (reset, segment_ids, positions)), None),
                       module.init_cache(b, jnp.float32))
  weights = {".".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(module))}
  twin = TWINS[name](check_config(cfg.to_dict()), weights)
  inputs = np_layers.BlockInputs(reset, segment_ids, positions)
  y_np, _ = twin(np.asarray(x), inputs)
  y_np_cached, _ = twin(np.asarray(x), inputs, twin.init_state(b))
  scale = float(np.max(np.abs(np.asarray(y))))
  errors = [float(np.max(np.abs(np.asarray(a) - np.asarray(y)))) / scale for a in (y_cached, y_np, y_np_cached)]
  print(f"{name}: max abs diff over max |y| = {scale:.1e} to the uncached JAX call (cached, NumPy, NumPy cached): "
        f"{errors}")
  assert max(errors) < 1e-5
