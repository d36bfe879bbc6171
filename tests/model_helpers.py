"""Shared by the export and generation tests: models with random, decisive parameters."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from yanjax.model.config import ModelConfig
from yanjax.model.lm import LanguageModel
from yanjax.model.mcsd import paper_log_rates


def random_model(cfg, seed=1, scale=0.3):
  """A model of `cfg` with random parameters drawn in NumPy (no per-shape init compiles): norm scales
  1 + N(0, scale), learned rates at the paper's values + N(0, scale), every other weight N(0, scale), so that
  norm scales and rates differ from their defaults and the logits are decisive."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  flat = nnx.to_flat_state(state)
  for path, variable in flat:
    base = {"scale": 1.0, "rate_logits": np.log(-paper_log_rates(cfg.channels))}.get(path[-1], 0.0)
    variable.set_value(jnp.asarray(base + scale * rng.standard_normal(variable.get_value().shape), jnp.float32))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


SMALL = dict(vocab_size=97, width=32, layers=2, channels=4, heads=2, mlp_width=64, max_decode_len=48)


def small_config(**changes) -> ModelConfig:
  """The export tests' small model (SMALL) with `changes`."""
  return ModelConfig(**{**SMALL, **changes})
