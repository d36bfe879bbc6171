"""The train state and its placement: one pytree {step, params, opt_state, rng} and its NamedShardings.

Shared by the trainer, the plan, the benchmarks and the tests, so each of them builds the state the trainer
runs. Neither function compiles or allocates anything but the state itself (`init_train_state` runs under
the caller's `jax.jit`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from yanjax.model.config import ModelConfig
from yanjax.model.lm import LanguageModel
from yanjax.training import sharding


def init_train_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int) -> dict:
  """A new state: step 0, the model's parameters from `seed`, the optimizer's state, the RNG key data."""
  params = nnx.to_pure_dict(nnx.state(LanguageModel(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param))
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
          "rng": jax.random.key_data(jax.random.PRNGKey(seed))}


def train_state_shardings(abstract_params: nnx.State, optimizer: optax.GradientTransformation, rules, mesh) -> dict:
  """Shardings of the train state: parameters by their logical axes; optimizer moments like their parameters.

  `mesh` may be a concrete Mesh or an AbstractMesh (the plan's). Traced under `jax.eval_shape`, so optax's
  placement, which runs `optimizer.init`, neither compiles nor allocates.
  """
  params = nnx.to_pure_dict(sharding.state_shardings(abstract_params, rules, mesh))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract_opt = jax.eval_shape(optimizer.init, nnx.to_pure_dict(abstract_params))
  found = {}

  def place():
    found["opt_state"] = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, params,
                                               transform_non_params=lambda _: replicated)

  jax.eval_shape(place)
  return {"step": replicated, "params": params, "opt_state": found["opt_state"], "rng": replicated}
