"""Pretrains a Yan (MCSD) or attention-baseline language model; the product's main job.

Run:  python -m yanjax.main.train --config configs/yan_tiny.py --workdir runs/yan_tiny [--config.train.steps=300]
Multi-host: the same command on every process (see launch/README.md). The workdir (and the data stores) may
be local or in a bucket (gs://, s3://). Re-running it on a workdir with checkpoints resumes from the latest
complete one, on any number of devices or hosts. SIGTERM / SIGINT, or JAX's preemption notice on multi-host
runs: save at the next step boundary, exit 42. User errors (config, paths, storage) are one line, exit 2.

First-time readers: `train` reads top to bottom in banner sections (distributed, config, data, mesh and state,
checkpoint, the loop and its hooks). The jitted pieces are built in trainer.py (the step itself in
train_step.py, placement rules in sharding.py); the loop is loop.py, what it does between steps hooks.py.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

from yanjax.core import lifetime

# A SIGTERM / SIGINT that arrives while the imports below load (seconds) is kept for StopRequest, which
# then exits with the requeue code instead of the default handler's 143. A trainer a sweep started dies with
# the sweep (yanjax/core/lifetime.py).
_EARLY_SIGNALS: list[int] = []
if __name__ == "__main__":
  lifetime.die_with_parent()
  for _signal in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_signal, lambda signum, _frame: _EARLY_SIGNALS.append(signum))

import jax  # pylint: disable=wrong-import-position
from absl import app, flags, logging
from ml_collections import config_flags

from yanjax.core import cli, storage
from yanjax.core.cli import USAGE_EXIT_CODE
from yanjax.core.config import ConfigError, config_flag_error
from yanjax.core.errors import UserError
from yanjax.data import tokenizer
from yanjax.data.errors import DataError
from yanjax.model import attention_kernel
from yanjax.model.config import ModelConfig
from yanjax.model.counting import param_count
from yanjax.training import compilation_cache, distributed, hooks, plan, sharding
from yanjax.training.checkpointing import Checkpointer, check_same_shapes
from yanjax.training.hosts import agree, process_zero, say
from yanjax.training.lease import Lease
from yanjax.training.loop import TrainLoop
from yanjax.training.run_config import validate_run_config
from yanjax.training.stop import StopRequest, stop_check
from yanjax.training.task_eval import TaskEvaluation
from yanjax.training.trainer import build_trainer
from yanjax.training.writers import open_writers

WORKDIR_PLACEHOLDER = "{workdir}"  # in data.stores and train.compilation_cache: the run's work directory
DEFAULT_CORPUS = "{workdir}/data/stdlib"  # the one store data.prepare_default may create
LOST_STORE_WAIT_S = 10.0  # after the store stopped answering: how long to wait for the last save's outcome

config_flags.DEFINE_config_file("config", "configs/yan_tiny.py", "Python config file (path[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory, local or gs:// / s3://: checkpoints, metrics, tokenizer, "
                    "samples, compilation cache. Required unless the config sets train.default_workdir (yan_tiny).")
flags.DEFINE_bool("verbose", False, "Show the full traceback of user errors too.")
flags.DEFINE_bool("allow_data_change", False, "Resume although the data stores, tokenizer, seed, global batch or "
                  "sequence length differ from the checkpoint's (logged); otherwise such a resume is refused.")
FLAGS = flags.FLAGS


def take_lease(workdir) -> Lease | None:
  """Process 0 takes the workdir's lease (one trainer per workdir); every process refuses when it is held."""
  lease, refusal = None, None
  if process_zero():
    lease = Lease(workdir)
    try:
      note = lease.acquire()
    except ConfigError as error:
      lease, refusal = None, str(error)
    else:
      atexit.register(lease.release)
      if note:
        say(note)
  if agree(refusal is not None):
    raise ConfigError(refusal or "process 0 could not take the work directory's lease (see its log)")
  return lease


def store_paths(cfg, workdir: str) -> list[str]:
  """The data stores of the run, with {workdir} replaced by the work directory."""
  return [store.replace(WORKDIR_PLACEHOLDER, workdir.rstrip("/")) for store in cfg.data.stores]


def prepare_data(cfg, workdir, rows: tuple[int, int]):
  """Opens the train and validation loaders of this process's block of rows `rows` (block, blocks:
  `sharding.process_rows`), preparing the default store first when it is missing.

  The default store lives under the work directory, which every host sees (a shared filesystem or a
  bucket), so process 0 prepares it once and the others wait, then read it.
  """
  from yanjax.data.loader import make_loader  # pylint: disable=import-outside-toplevel  # grain only where data is read
  stores = store_paths(cfg, str(workdir))
  store = storage.as_path(stores[0])
  default_corpus = cfg.data.prepare_default and cfg.data.stores[0] == DEFAULT_CORPUS  # never a mistyped store
  if default_corpus and not storage.check_readable(store / "metadata.json", "data store",
                                                   "check data.stores and the credentials"):
    failed = None
    if process_zero():
      from yanjax.data.prepare import PrepareSettings, prepare_store  # pylint: disable=import-outside-toplevel
      say(f"preparing the default corpus (the Python standard library) into {store}")
      try:
        prepare_store(PrepareSettings(output=str(store), vocab_size=cfg.model.vocab_size,
                                      validation_fraction=cfg.data.validation_fraction))
      except UserError as error:
        failed = error
    if agree(failed is not None):
      raise failed or DataError(f"preparing the default corpus into {store} failed on process 0")
  common = dict(weights=list(cfg.data.weights) or None, seq_len=cfg.train.seq_len,
                global_batch=cfg.train.global_batch, seed=cfg.train.seed, process_index=rows[0],
                process_count=rows[1], packing=cfg.data.packing,
                expected_vocab_size=cfg.model.vocab_size)
  train = make_loader(stores, split="train", **common)
  validation = make_loader(stores, split="validation", **common)
  return train, validation


def data_identity(cfg, loader) -> dict:
  """What decides the batches a run sees: the stores' fingerprints, the tokenizer, seed, batch, length."""
  return {"store_fingerprints": [store.metadata["fingerprint"] for store in loader.stores],
          "tokenizer_sha256": loader.stores[0].tokenizer_sha256, "seed": cfg.train.seed,
          "global_batch": cfg.train.global_batch, "seq_len": cfg.train.seq_len}


def check_resume(meta: dict, model_cfg: ModelConfig, identity: dict):
  """Refuses to resume a checkpoint of another model shape, or (unless --allow_data_change) other data."""
  check_same_shapes(ModelConfig.saved(meta["config"]["model"]), model_cfg)
  saved = meta.get("data", {}).get("identity")
  changed = [f"{key}: {saved[key]!r} -> {value!r}" for key, value in identity.items()
             if saved is not None and saved.get(key) != value]
  if not changed:
    return
  what = "; ".join(c if len(c) < 120 else c[:117] + "..." for c in changed)
  if not FLAGS.allow_data_change:
    raise ConfigError(f"the checkpoint at step {meta['step']} was trained on other data ({what}): the resumed run "
                      "would see other batches. Resume with the original data settings, start a new --workdir, or "
                      "pass --allow_data_change to continue on the new data on purpose")
  logging.warning("resuming step %d on changed data (--allow_data_change): %s", meta["step"], what)
  say(f"warning: resuming on changed data (--allow_data_change): {what}")


def write_tokenizer(workdir, loader):
  """The workdir's tokenizer (tokenizer.model or tokenizer.json) is the one its checkpoints were trained with:
  replaced with the data's, the other kind's file removed."""
  if not process_zero():
    return
  data = loader.tokenizer_bytes()
  name = tokenizer.from_bytes(data, "the data stores' tokenizer").file_name
  for other in tokenizer.FILE_NAMES.values():
    if other != name and (workdir / other).exists():
      (workdir / other).unlink()
  path = workdir / name
  if not path.exists() or path.read_bytes() != data:
    storage.write_atomic(path, data)


def storage_lost(workdir, checkpointer: Checkpointer) -> storage.StorageUnreachable:
  """The one-line error of a store that stopped answering mid-run, naming the checkpoint a re-run resumes from."""
  committed = checkpointer.committed_step(timeout_s=LOST_STORE_WAIT_S)
  safe = (f"the last checkpoint that is safe is step {committed}, committed before the outage" if committed
          is not None else "no checkpoint of this run was committed before the outage")
  return storage.StorageUnreachable(
      f"{workdir}: the storage service became unreachable during training ({storage.endpoint_hint(workdir)}); "
      f"{safe}: re-run the same command once the store answers again to resume from it")


def main(argv):
  """Runs `train`; a user error (bad config, path, storage or data store) is one line on stderr, exit 2."""
  del argv
  try:
    train()
  except Exception as error:  # pylint: disable=broad-except  # user errors become one line; others re-raise
    if FLAGS.verbose or not cli.is_user_error(error):
      raise
    print(f"error: {cli.describe(error)}", file=sys.stderr, flush=True)
    if isinstance(error, storage.StorageUnreachable):
      # orbax's save threads still retry the dead store, and the interpreter's exit would wait for them
      # (minutes), then print their errors; the lease cannot be released without the store either.
      sys.stdout.flush()
      os._exit(USAGE_EXIT_CODE)  # pylint: disable=protected-access
    sys.exit(USAGE_EXIT_CODE)


def train():
  """The run: distributed set-up, config, data, trainer, checkpoint, then the loop and its hooks."""
  logging.set_verbosity(logging.WARNING)  # orbax and grain log every file at INFO; ours go through `say`
  stop = StopRequest(_EARLY_SIGNALS)
  # ---- distributed -------------------------------------------------------------------------------------
  distributed.initialize_from_flags()
  stop.join_cluster()
  cfg = FLAGS.config
  model_cfg = validate_run_config(cfg)
  if not (FLAGS.workdir or cfg.train.default_workdir):
    raise ConfigError("--workdir is required for this config (only configs that set train.default_workdir, "
                      "like configs/yan_tiny.py, have one): give --workdir=<local path, gs:// or s3:// URL>")
  workdir = storage.as_path(FLAGS.workdir or cfg.train.default_workdir)
  if process_zero():
    storage.check_writable(workdir, "workdir", "give a --workdir this job can write to")
  else:
    storage.check_readable(workdir, "workdir", "every host must reach the --workdir")
  lease = take_lease(workdir)
  if cfg.train.compilation_cache:
    compilation_cache.enable(cfg.train.compilation_cache.replace(WORKDIR_PLACEHOLDER, str(workdir)))

  # ---- mesh (yanjax/training/trainer.py: the jitted init, train and eval steps; nothing compiles yet) ---------
  trainer = build_trainer(cfg)
  mesh = dict(trainer.mesh.shape)

  # ---- data: the rows this process's devices hold ---------------------------------------------------------
  rows = sharding.process_rows(trainer.batch_sharding, cfg.train.global_batch, cfg.train.seq_len)
  train_loader, val_loader = prepare_data(cfg, workdir, rows)
  stop.exit_if_requested("while the data was prepared")

  # ---- state ----------------------------------------------------------------------------------------------
  data_tokenizer = tokenizer.from_bytes(val_loader.tokenizer_bytes(), "the data stores' tokenizer")
  # The in-loop evaluation's tasks resolve (or fail in one line) before anything compiles.
  evaluation = (TaskEvaluation(trainer.graphdef, data_tokenizer, val_loader.stores[0], cfg.evaluate)
                if cfg.evaluate.every else None)
  # Refuses, before anything compiles, a run predicted not to fit in a device's memory (yanjax/training/plan.py).
  plan.check_fits(cfg, jax.device_count(), jax.devices()[0].device_kind)
  abstract_state = trainer.abstract_state()
  report = sharding.replication_report(abstract_state["params"], trainer.state_sharding["params"])
  count = param_count(model_cfg)
  say(f"mesh {mesh}; parameters {count.total:,} total, {count.active:,} active per token; each "
      f"device holds {100 * report['fraction_per_device']:.1f}% of the parameter bytes "
      f"({report['fully_replicated_bytes']:,} bytes fully replicated)")
  length_ways = sharding.axis_ways(trainer.mesh, dict(cfg.rules), "length")
  if length_ways > 1:
    say(f"sequence parallel: each sequence's {cfg.train.seq_len} positions over {length_ways} devices")
  kernel = attention_kernel.for_run(model_cfg, cfg.train.seq_len, length_ways)
  if kernel:
    say(f"attention: training passes on {kernel} (model.attention_kernel={model_cfg.attention_kernel!r}), "
        "decoding on xla")

  # ---- checkpoint: resume or start ------------------------------------------------------------------
  checkpointer = Checkpointer(workdir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
  identity = data_identity(cfg, train_loader)
  restored = checkpointer.restore_latest(abstract_state, lambda meta: check_resume(meta, model_cfg, identity))
  if process_zero():  # the run's record, once its config is accepted: a refused resume leaves the old one
    storage.write_atomic(workdir / "config.json", cfg.to_json_best_effort(indent=2))
  write_tokenizer(workdir, train_loader)
  if restored is None:
    state, start, meta = trainer.init(), 0, {}
  else:
    start, state, meta = restored
    saved_mesh = meta.get("mesh", mesh)
    say(f"resumed from the checkpoint at step {start} in {workdir}" +
        (f" (saved on mesh {saved_mesh}, restored onto {mesh})" if saved_mesh != mesh else ""))
  stop.exit_if_requested("before the first step")

  # ---- the loop and its hooks (yanjax/training/loop.py, hooks.py), in the order they run ----------------
  monitor = hooks.LossMonitor(cfg.train.spike_window, cfg.train.spike_factor, **meta.get("loss_monitor", {}))
  writers = open_writers(workdir, cfg, resume_step=start)
  logger = hooks.MetricsLogger(writers, cfg.train, model_cfg, start, monitor)

  def checkpoint_meta(step):
    return {"step": step, "data": {"next_step": step, "stores": store_paths(cfg, str(workdir)), "identity": identity},
            "config": cfg.to_dict(), "mesh": mesh, "process_count": jax.process_count(),
            "loss_monitor": monitor.state()}

  save = hooks.SaveCheckpoint(checkpointer, logger, checkpoint_meta)
  loop = TrainLoop(trainer, cfg.train)
  if cfg.train.profile_steps and process_zero():
    profile = hooks.Profile(workdir, cfg.train.profile_start_step, cfg.train.profile_steps)
    loop.add_hook(profile, every=1)
    loop.add_hook(profile.close, at_end=True)
  if lease is not None:
    loop.add_hook(lambda _: lease.renew(), every=1)
  loop.add_hook(hooks.report_compilation, every=1)
  loop.add_hook(logger, every=1)
  loop.add_hook(logger.close, at_end=True)
  if cfg.train.eval_every:
    loop.add_hook(hooks.Evaluate(trainer, val_loader, cfg.train.eval_batches, writers, data_tokenizer.token_bytes()),
                  every=cfg.train.eval_every)
  if evaluation is not None:
    loop.add_hook(lambda info: evaluation(info, writers), every=cfg.evaluate.every)
  loop.add_hook(stop_check(stop, cfg.train.log_every), every=1)
  loop.add_hook(save, every=cfg.checkpoint.every_steps, seconds=60 * cfg.checkpoint.every_minutes, at_stop=True)
  if cfg.train.sample_tokens:
    loop.add_hook(hooks.Sample(trainer.graphdef, cfg.train, workdir), at_end=True)
  loop.add_hook(lambda _: compilation_cache.report(say), at_end=True)
  loop.add_hook(save.close, at_end=True)

  try:
    info = loop.run(state, start, iter(train_loader.iterate(start)))
  except Exception as error:  # pylint: disable=broad-except  # a store that stopped answering becomes one line
    if not (storage.is_remote(workdir) and storage.is_unreachable(error)):
      raise
    logger.progress.close()  # the error's line goes below the progress bar
    raise storage_lost(workdir, checkpointer) from error
  if info.exit_code:
    logging.warning("stopped at step %d (exit code %d); re-run the same command to resume", info.step,
                    info.exit_code)
    sys.exit(info.exit_code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad --config or --config.<key> override as one line (exit 2), and --help
  (absl exits 1 after printing it) a success."""
  try:
    remaining = FLAGS(argv)
    FLAGS.config.keys()  # config_flags defers a config file's load error to the first access
    return remaining
  except SystemExit as stop:  # absl's --help, --helpfull
    sys.exit(0 if cli.wants_help(argv) else stop.code)
  except Exception as error:  # pylint: disable=broad-except  # config_flags raises what the override hit
    message = config_flag_error(argv, error, "configs/yan_tiny.py",
                                "; check the flags (python -m yanjax.main.train --helpfull)")
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT_CODE)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
