"""The run config: every section a training run reads, with defaults, validated before anything compiles.

A config file's `get_config()` returns `build_run_config(model=..., **section_overrides)`: a whole run. Keys
whose right value depends on the model's size (batch and sequence length, steps or token budget, learning
rate and warmup, mesh, data stores, checkpoint cadence) have no default (`REQUIRED`): every config file sets
them, so none inherits a tiny run's values. Command-line overrides (`--config.train.steps=300`) act on the
resulting locked ConfigDict, so an unknown key fails at parse time; `validate_run_config` then checks values
and combinations and names the offending key.
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

from yanjax.core import storage
from yanjax.core.config import ConfigError
from yanjax.model.attention_kernel import ATTENTION_MIXERS, SPLIT_PROBLEM
from yanjax.model.config import ModelConfig
from yanjax.numpy_runtime.mixers import TWINS

MESH_AXES = ("data", "fsdp", "sequence", "tensor", "expert")
REQUIRED = None  # a key every config file sets

DEFAULTS: dict[str, Any] = {
    "train": {
        "seed": 0,
        "steps": REQUIRED,  # optimizer steps; 0 when `tokens` sets them
        "tokens": 0,  # token budget: steps = tokens // (global_batch * seq_len) when > 0
        "global_batch": REQUIRED,  # sequences per step, over all devices
        "seq_len": REQUIRED,
        "default_workdir": "",  # --workdir when none is given ("": --workdir is required)
        "grad_accum": 1,  # micro-batches per step; global_batch must divide by it
        "z_loss_weight": 1e-4,  # logit z-loss: mean(logsumexp(logits)^2)
        # Positions whose logits the loss computes at a time (yanjax/model/head.py); 0: all of them at once.
        "loss_chunk": 512,
        "nan_policy": "skip",  # "skip": drop the update and log it; "stop": save and stop
        "log_every": 10,
        "eval_every": 100,
        "eval_batches": 4,
        "sample_tokens": 64,  # a generated sample at the end (0: none)
        "sample_prompt": "def ",
        "transfer_guard": True,  # jax_transfer_guard="disallow" around the step (catches silent host copies)
        # JAX's persistent compilation cache, local or gs:// / s3:// ("" turns it off); {workdir}: the run's
        "compilation_cache": "{workdir}/compilation_cache",
        # Counted as `loss_spikes`: a loss above spike_factor x the median of the last spike_window losses.
        "spike_window": 100,
        "spike_factor": 2.0,
        # A jax.profiler trace of profile_steps steps from profile_start_step (process 0; 0 steps: off).
        "profile_start_step": 3,
        "profile_steps": 0,
        "wandb_project": "",  # Weights & Biases project of the run's metrics ("": no W&B)
        "wandb_mode": "online",  # or "offline": written under $WANDB_DIR, uploaded later with `wandb sync`
    },
    "optimizer": {
        "lr": REQUIRED,  # peak learning rate
        "schedule": "cosine",  # "cosine" (warmup + cosine) or "wsd" (warmup-stable-decay)
        "warmup_steps": REQUIRED,
        "decay_fraction": 0.2,  # wsd: last fraction of steps that decays linearly to min_lr
        "min_lr_ratio": 0.1,
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,
        "weight_decay": 0.1,  # not applied to norms, biases, rates (parameters with fewer than 2 dims)
        "clip_norm": 1.0,
    },
    "data": {
        # Token stores, local or gs:// / s3://; {workdir} is the run's work directory. Tuples: ml_collections
        # overrides them as --config.data.stores="('a', 'b')".
        "stores": REQUIRED,
        "weights": (),  # mixing weights, one per store; empty: equal weights
        "prepare_default": False,  # prepare the first store from the standard library when it is missing
        "packing": True,
        "validation_fraction": 0.05,  # used when preparing the default store
    },
    # "sequence" splits every sequence's time axis over its devices (docs/sequence_parallel.md); 1: no split.
    "mesh": {"data": REQUIRED, "fsdp": REQUIRED, "sequence": 1, "tensor": REQUIRED, "expert": REQUIRED},
    # Logical axis -> mesh axes. Sharding strategy is data: FSDP puts "embed" on "fsdp"; tensor parallelism
    # puts "mlp", "heads", "channels", "vocab" on "tensor"; "experts" go to "expert"; sequence parallelism puts
    # "length" (time) on "sequence".
    "rules": (
        ("batch", ("data", "fsdp", "expert")),
        ("length", ("sequence",)),
        ("embed", ("fsdp",)),
        ("vocab", ("tensor",)),
        ("mlp", ("tensor",)),
        ("heads", ("tensor",)),
        ("channels", ("tensor",)),
        ("experts", ("expert",)),
        ("layers", ()),
    ),
    # In-loop evaluation (yanjax/training/task_eval.py): `tasks` on the training parameters every `every` steps.
    "evaluate": {
        "every": 0,  # steps between evaluations (0: none)
        "tasks": (),  # "passkey" and/or lm-eval task names or task YAML files (the `eval` extra)
        "include_path": "",  # a directory of task YAMLs that `tasks` may name
        "limit": 0,  # lm-eval: at most this many documents per task (0: all)
        "passkey_contexts": (256, 1024),  # tokens; an attention model answers those its KV cache holds
        "passkey_depths": (0.0, 0.5, 1.0),
        "passkey_trials": 2,  # per context and depth
    },
    "checkpoint": {
        "every_steps": REQUIRED,
        "every_minutes": 0.0,  # also save when this much wall time passed since the last save (0: off)
        "keep": 3,
        "async_save": True,
    },
}


def build_run_config(model: ModelConfig, **sections) -> ml_collections.ConfigDict:
  """Defaults updated by `sections` (dicts of overrides), with `model` as a dict; locked against new keys."""
  values = copy.deepcopy(DEFAULTS)
  for name, overrides in sections.items():
    if name not in values:
      raise ConfigError(f"unknown config section {name!r}; sections are {sorted(values) + ['model']}")
    unknown = sorted(set(overrides) - set(values[name])) if isinstance(values[name], dict) else []
    if unknown:
      raise ConfigError(f"unknown key(s) {unknown} in config section {name!r}")
    values[name] = {**values[name], **overrides} if isinstance(values[name], dict) else overrides
  missing = [f"{section}.{key}" for section, keys in values.items() if isinstance(keys, dict)
             for key, value in keys.items() if value is REQUIRED]
  if missing:
    raise ConfigError(f"the config does not set {missing}: a config file is a whole run and sets every "
                      "size-dependent key (see yanjax/training/run_config.py: DEFAULTS and configs/yan_tiny.py)")
  cfg = ml_collections.ConfigDict({"model": model.to_dict(), **values})
  cfg.lock()
  return cfg


def tokens_per_step(cfg: ml_collections.ConfigDict) -> int:
  return cfg.train.global_batch * cfg.train.seq_len


def validate_run_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
  """Checks every section, then what one section asks of another; returns the ModelConfig. Raises ConfigError
  naming the key. Sets train.steps from train.tokens when a token budget is given."""
  _check_known_keys(cfg)
  model = ModelConfig.from_dict(cfg.model)

  def fail(key, why):
    raise ConfigError(f"{key}={eval_key(cfg, key)!r}: {why}")

  _check_train(cfg.train, fail)
  _check_optimizer(cfg.optimizer, cfg.train.steps, fail)
  _check_data(cfg.data, fail)
  _check_checkpoint(cfg.checkpoint, fail)
  _check_mesh(cfg.mesh, fail)
  _check_rules(cfg.rules)
  _check_evaluate(cfg.evaluate, fail)
  _check_model_against_train(model, cfg.train, fail)
  _check_sequence_split(model, cfg.train.seq_len, cfg.mesh.sequence, fail)
  return model


def _check_known_keys(cfg: ml_collections.ConfigDict) -> None:
  for section in cfg.keys():
    if section != "model" and section not in DEFAULTS:
      raise ConfigError(f"unknown config section {section!r}")
  for section, defaults in DEFAULTS.items():
    if isinstance(defaults, dict):
      unknown = sorted(set(cfg[section].keys()) - set(defaults))
      if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in config section {section!r}")


def _check_train(train: ml_collections.ConfigDict, fail) -> None:
  _check_train_length(train, fail)
  if not isinstance(train.eval_every, int) or train.eval_every < 0:
    fail("train.eval_every", "must be a positive integer, or 0 to turn evaluation off")
  if train.eval_every and (not isinstance(train.eval_batches, int) or train.eval_batches < 1):
    fail("train.eval_batches", "must be >= 1 while evaluation is on (train.eval_every=0 turns it off)")
  _each(train, "train", ("z_loss_weight", "sample_tokens", "seed"), lambda v: v >= 0, "must be >= 0", fail)
  if not isinstance(train.loss_chunk, int) or train.loss_chunk < 0:
    fail("train.loss_chunk", "must be an integer >= 0: positions per chunk of the loss (0: one chunk, the whole "
         "logits)")
  if train.global_batch % train.grad_accum:
    fail("train.grad_accum", f"train.global_batch={train.global_batch} must divide by it")
  if train.nan_policy not in ("skip", "stop"):
    fail("train.nan_policy", "must be 'skip' or 'stop'")
  if not isinstance(train.spike_window, int) or train.spike_window < 1:
    fail("train.spike_window", "must be a positive integer (losses in the running median)")
  if not train.spike_factor > 1:
    fail("train.spike_factor", "must be > 1 (a spike is a loss this many times the running median)")
  if not isinstance(train.profile_steps, int) or train.profile_steps < 0:
    fail("train.profile_steps", "must be an integer >= 0 (0: no profile)")
  if train.profile_steps and (not isinstance(train.profile_start_step, int) or train.profile_start_step < 2):
    fail("train.profile_start_step", "must be >= 2 while profiling is on (step 1 compiles; the trace starts "
         "after the step before it)")
  if train.wandb_mode not in ("online", "offline"):
    fail("train.wandb_mode", "must be 'online' or 'offline'")
  _check_url("train.compilation_cache", train.compilation_cache)


def _check_train_length(train: ml_collections.ConfigDict, fail) -> None:
  """The batch, sequence and run lengths; sets train.steps = train.tokens // tokens per step when a token
  budget is given."""
  _each(train, "train", ("global_batch", "seq_len"), _is_positive_int, "must be a positive integer", fail)
  if not isinstance(train.tokens, int) or train.tokens < 0:
    fail("train.tokens", "must be a token budget >= 0 (0: train.steps sets the length)")
  if train.tokens:
    per_step = train.global_batch * train.seq_len
    if train.steps not in (0, train.tokens // per_step):
      fail("train.steps", f"set either train.steps or train.tokens={train.tokens}; set the other to 0")
    if train.tokens < per_step:
      fail("train.tokens", f"is smaller than one step (global_batch x seq_len = {per_step:,} "
           "tokens); raise it or lower train.global_batch")
    train.steps = train.tokens // per_step
  _each(train, "train", ("steps", "grad_accum", "log_every"), _is_positive_int, "must be a positive integer", fail)


def _check_optimizer(opt: ml_collections.ConfigDict, steps: int, fail) -> None:
  """`steps`: train.steps, which the warmup must fit in."""
  for key, low, high, closed in (("b1", 0, 1, False), ("b2", 0, 1, False), ("min_lr_ratio", 0, 1, True)):
    if not (low <= opt[key] <= high if closed else low <= opt[key] < high):
      fail(f"optimizer.{key}", f"must be in [{low}, {high}{']' if closed else ')'}")
  _each(opt, "optimizer", ("clip_norm", "eps"), lambda v: v > 0, "must be > 0", fail)
  if not opt.weight_decay >= 0:
    fail("optimizer.weight_decay", "must be >= 0")
  if opt.schedule not in ("cosine", "wsd"):
    fail("optimizer.schedule", "must be 'cosine' or 'wsd'")
  if not 0 <= opt.warmup_steps < steps:
    fail("optimizer.warmup_steps", f"must be in [0, train.steps={steps})")
  if not 0 < opt.decay_fraction <= 1:
    fail("optimizer.decay_fraction", "must be in (0, 1]")
  if opt.lr <= 0:
    fail("optimizer.lr", "must be positive")


def _check_data(data: ml_collections.ConfigDict, fail) -> None:
  if not 0 < data.validation_fraction < 1:
    fail("data.validation_fraction", "must be in (0, 1)")
  if any(not w > 0 for w in data.weights):
    fail("data.weights", "every mixing weight must be > 0")
  if not data.stores:
    fail("data.stores", "name at least one token store")
  for path in data.stores:
    _check_url("data.stores", path)
  if data.weights and len(data.weights) != len(data.stores):
    fail("data.weights", f"needs one weight per store ({len(data.stores)})")


def _check_checkpoint(checkpoint: ml_collections.ConfigDict, fail) -> None:
  _each(checkpoint, "checkpoint", ("every_steps", "keep"), _is_positive_int, "must be a positive integer", fail)
  if not checkpoint.every_minutes >= 0:
    fail("checkpoint.every_minutes", "must be >= 0")


def _check_mesh(mesh: ml_collections.ConfigDict, fail) -> None:
  for axis in MESH_AXES:
    if not isinstance(mesh[axis], int) or (mesh[axis] < 1 and mesh[axis] != -1):
      fail(f"mesh.{axis}", "must be a positive integer or -1 (fill the remaining devices)")
  if sum(mesh[a] == -1 for a in MESH_AXES) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1, got {dict(mesh)}")


def _check_rules(rules) -> None:
  for rule in rules:
    if len(rule) != 2 or any(axis not in MESH_AXES for axis in rule[1]):
      raise ConfigError(f"rules: {rule!r} must be (logical_name, (mesh axes from {MESH_AXES}))")


def _check_model_against_train(model: ModelConfig, train: ml_collections.ConfigDict, fail) -> None:
  """What the training run asks of the model."""
  if model.max_context is not None and train.seq_len > model.max_context:
    fail("model.max_decode_len", f"must be >= train.seq_len={train.seq_len}")
  for mixer in dict.fromkeys(model.pattern):
    problem = TWINS[mixer].check_training(model.to_dict(), train.seq_len)
    if problem:
      fail(f"model.{problem[0]}", problem[1])


def _check_sequence_split(model: ModelConfig, seq_len: int, ways: int, fail) -> None:
  """mesh.sequence splits every sequence into `ways` segments (-1: checked with the devices, by the trainer)."""
  if ways > 1 and seq_len % ways:
    fail("mesh.sequence", f"must divide train.seq_len={seq_len} (each device takes seq_len / sequence positions)")
  if ways != 1 and model.attention_kernel == "cudnn" and set(model.pattern) & set(ATTENTION_MIXERS):
    fail("model.attention_kernel", f"{SPLIT_PROBLEM}; set model.attention_kernel='auto' or 'xla'")


def _check_evaluate(section: ml_collections.ConfigDict, fail) -> None:
  if not isinstance(section.every, int) or section.every < 0:
    fail("evaluate.every", "must be an integer >= 0 (0: no in-loop evaluation)")
  if bool(section.every) != bool(section.tasks):
    fail("evaluate.tasks", f"evaluate.every={section.every}: set both the tasks and how often they run, or neither")
  if not isinstance(section.limit, int) or section.limit < 0:
    fail("evaluate.limit", "must be an integer >= 0 (0: every document)")
  if "passkey" in section.tasks:
    if not section.passkey_contexts or min(section.passkey_contexts) < 1:
      fail("evaluate.passkey_contexts", "give positive token counts")
    if not section.passkey_depths or not all(0.0 <= d <= 1.0 for d in section.passkey_depths):
      fail("evaluate.passkey_depths", "each depth must be within [0, 1]")
    if section.passkey_trials < 1:
      fail("evaluate.passkey_trials", "must be >= 1")


def _each(section: ml_collections.ConfigDict, name: str, keys, ok, why: str, fail) -> None:
  """fail(f"{name}.{key}", why) for the first of `keys` whose value is not `ok`."""
  for key in keys:
    if not ok(section[key]):
      fail(f"{name}.{key}", why)


def _is_positive_int(value) -> bool:
  return isinstance(value, int) and value > 0


def _check_url(key: str, path: str) -> None:
  """storage.check_url, with {workdir} standing for any directory; the error names `key`."""
  try:
    storage.check_url(path.replace("{workdir}", "workdir"))
  except ConfigError as e:
    raise ConfigError(f"{key}: {e}") from None


def eval_key(cfg: ml_collections.ConfigDict, dotted: str):
  value = cfg
  for part in dotted.split("."):
    value = value[part]
  return value
