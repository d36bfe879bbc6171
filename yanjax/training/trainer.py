"""The trainer's jitted pieces, built from a run config in one place: `python -m yanjax.main.train`, the tests and
the benchmarks all run exactly these.

Nothing compiles here (`jax.jit` is lazy) and nothing is allocated before `init()` runs. Importing this
module defines no command-line flags (yanjax/main/train.py owns those).

Train state and batch: see yanjax/training/train_step.py.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from yanjax.model.config import ModelConfig
from yanjax.model.lm import LanguageModel
from yanjax.training import sharding
from yanjax.training.optim import decay_mask, learning_rate_schedule, make_optimizer
from yanjax.training.run_config import validate_run_config
from yanjax.training.train_state import init_train_state, train_state_shardings
from yanjax.training.train_step import make_eval_step, make_train_step


class Trainer(NamedTuple):
  """What `build_trainer` returns."""
  model_cfg: ModelConfig
  mesh: Mesh
  graphdef: nnx.GraphDef
  global_batch: int  # sequences per step, over all processes
  state_sharding: dict  # NamedShardings of the train state pytree
  batch_sharding: NamedSharding  # of every [B, T] batch array: B over the batch mesh axes, T over the length ones
  init: Callable[[], dict]  # jitted: a new train state from train.seed, placed by `state_sharding`
  train_step: Callable[[dict, dict], tuple[dict, dict]]  # jitted (state, batch) -> (state, metrics); donates state
  eval_step: Callable[[dict, dict], dict]  # jitted (params, batch) -> validation sums

  def abstract_state(self) -> Any:
    """ShapeDtypeStructs of the train state carrying its shardings (a restore target); allocates nothing."""
    return jax.eval_shape(self.init)

  def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's block of rows [B / n, T] (`sharding.process_rows`) -> global arrays [B, T] placed by
    `batch_sharding`."""
    return sharding.global_batch_array(batch, self.batch_sharding, self.global_batch)


def build_trainer(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Trainer:
  """The trainer of run config `cfg` (validated here) on `devices` (default: all) laid out as `cfg.mesh`.

  Raises ConfigError when the mesh does not fit the devices or the global batch does not split over it.
  """
  model_cfg = validate_run_config(cfg)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  rules = {name: tuple(axes) for name, axes in cfg.rules}
  sharding.check_batch_divides(cfg.train.global_batch, cfg.train.grad_accum, cfg.train.seq_len, mesh, rules)
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(0))))
  schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
  optimizer = make_optimizer(cfg.optimizer, cfg.train.steps, decay_mask(abstract_params))
  state_sharding = train_state_shardings(abstract_params, optimizer, rules, mesh)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  seed = cfg.train.seed
  init = jax.jit(lambda: init_train_state(model_cfg, optimizer, seed), out_shardings=state_sharding)
  step = make_train_step(graphdef, optimizer, schedule, cfg.train.grad_accum, cfg.train.z_loss_weight,
                         cfg.train.loss_chunk)
  train_step = jax.jit(sharding.with_activation_rules(step, mesh, rules),
                       in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None),
                       donate_argnums=0)
  eval_step = jax.jit(sharding.with_activation_rules(make_eval_step(graphdef, cfg.train.loss_chunk), mesh, rules),
                      in_shardings=(state_sharding["params"], batch_sharding))
  return Trainer(model_cfg, mesh, graphdef, cfg.train.global_batch, state_sharding, batch_sharding, init,
                 train_step, eval_step)
