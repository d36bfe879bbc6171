"""Pretrains a Yan (MCSD) or attention-baseline language model; the product's main job.

Run:  python -m yanjax.train --config configs/yan_tiny.py --workdir runs/yan_tiny [--config.train.steps=300]
Multi-host: the same command on every process (see launch/README.md). The workdir (and the data stores) may
be local or in a bucket (gs://, s3://). Re-running it on a workdir with checkpoints resumes from the latest
complete one, on any number of devices or hosts. SIGTERM / SIGINT, or JAX's preemption notice on multi-host
runs: save at the next step boundary, exit 42. User errors (config, paths, storage) are one line, exit 2.

First-time readers: `main` reads top to bottom in banner sections (distributed, config, data, mesh and state,
checkpoint, loop, end). The step itself is in train_step.py; placement rules in sharding.py.
"""

from __future__ import annotations

import atexit
import signal
import sys
import time

# A SIGTERM / SIGINT that arrives while the imports below load (seconds) is kept for StopRequest, which
# then exits with the requeue code instead of the default handler's 143.
_EARLY_SIGNALS: list[int] = []
if __name__ == "__main__":
  for _signal in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_signal, lambda signum, _frame: _EARLY_SIGNALS.append(signum))

import jax  # pylint: disable=wrong-import-position
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from yanjax import cli, compilation_cache, distributed, plan, sharding, storage
from yanjax.cli import PREEMPTED_EXIT_CODE, USAGE_EXIT_CODE
from yanjax.checkpointing import TOKENIZER_FILE, Checkpointer, check_same_shapes
from yanjax.config import ConfigError, ModelConfig
from yanjax.data.errors import DataError
from yanjax.lease import Lease
from yanjax.metrics import MetricsWriter, mfu, process_zero
from yanjax.model.counting import flops_per_token, param_count
from yanjax.model.lm import LanguageModel
from yanjax.optim import decay_mask, learning_rate_schedule, make_optimizer
from yanjax.run_config import validate_run_config
from yanjax.train_state import init_train_state, train_state_shardings
from yanjax.train_step import eval_scalars, make_eval_step, make_train_step

NONFINITE_EXIT_CODE = 3  # nan_policy="stop": saved and stopped on a non-finite loss
WORKDIR_PLACEHOLDER = "{workdir}"  # in data.stores and train.compilation_cache: the run's work directory
DEFAULT_CORPUS = "{workdir}/data/stdlib"  # the one store data.prepare_default may create

config_flags.DEFINE_config_file("config", "configs/yan_tiny.py", "Python config file (path[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory, local or gs:// / s3://: checkpoints, metrics, tokenizer, "
                    "samples, compilation cache. Required unless the config sets train.default_workdir (yan_tiny).")
flags.DEFINE_bool("verbose", False, "Show the full traceback of user errors too.")
flags.DEFINE_bool("allow_data_change", False, "Resume although the data stores, tokenizer, seed, global batch or "
                  "sequence length differ from the checkpoint's (logged); otherwise such a resume is refused.")
FLAGS = flags.FLAGS


class StopRequest:
  """Set by SIGTERM / SIGINT, or JAX's preemption notice; the loop saves and exits at the next step boundary.

  On a multi-process run with JAX's preemption service (on by default), JAX owns SIGTERM: its notifier
  tells every host, and `multihost_utils.reached_preemption_sync_point` names one step at which all of them
  save. The service's other notifiers (where the platform has them) reach the same sync point.
  """

  def __init__(self):
    """Installed first thing, so a signal during start-up is not lost (see `exit_if_requested`)."""
    self.signal = _EARLY_SIGNALS[0] if _EARLY_SIGNALS else None
    self.preemption_service = False
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)

  def join_cluster(self):
    """After `jax.distributed.initialize`: with JAX's preemption service, its notifier now owns SIGTERM."""
    self.preemption_service = (jax.process_count() > 1 and
                               jax._src.distributed.global_state.preemption_sync_manager is not None)  # pylint: disable=protected-access

  def exit_if_requested(self, where: str):
    """Before the first step there is nothing to save: exit at once with the requeue code."""
    if self.signal is not None:
      _say(f"stopped by {signal.Signals(self.signal).name} {where}: nothing to save yet")
      sys.exit(PREEMPTED_EXIT_CODE)

  def preempted(self, step: int) -> bool:
    """True on every process at the step JAX's preemption service chose (call it at every step)."""
    return self.preemption_service and multihost_utils.reached_preemption_sync_point(step)

  def _handle(self, signum, _frame):
    self.signal = signum
    logging.warning("received %s: saving at the next step boundary", signal.Signals(signum).name)

  def agreed(self) -> bool:
    """True on every process if any process was signalled (a collective: call at the same steps everywhere)."""
    local = self.signal is not None
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.array(local))))


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
        _say(note)
  if _agree(refusal is not None):
    raise ConfigError(refusal or "process 0 could not take the work directory's lease (see its log)")
  return lease


def store_paths(cfg, workdir: str) -> list[str]:
  """The data stores of the run, with {workdir} replaced by the work directory."""
  return [store.replace(WORKDIR_PLACEHOLDER, workdir.rstrip("/")) for store in cfg.data.stores]


def prepare_data(cfg, workdir):
  """Opens the train and validation loaders, preparing the default store first when it is missing.

  The default store lives under the work directory, which every host sees (a shared filesystem or a
  bucket), so process 0 prepares it once and the others wait, then read it.
  """
  from yanjax.data import make_loader  # pylint: disable=import-outside-toplevel  # grain only where data is read
  stores = store_paths(cfg, str(workdir))
  store = storage.as_path(stores[0])
  default_corpus = cfg.data.prepare_default and cfg.data.stores[0] == DEFAULT_CORPUS  # never a mistyped store
  if default_corpus and not storage.check_readable(store / "metadata.json", "data store",
                                                   "check data.stores and the credentials"):
    failed = 0
    if process_zero():
      from data_pipelines import prepare  # pylint: disable=import-outside-toplevel
      _say(f"preparing the default corpus (the Python standard library) into {store}")
      failed = prepare.main(["--output", str(store), "--vocab_size", str(cfg.model.vocab_size),
                             "--validation_fraction", str(cfg.data.validation_fraction)])
    if _agree(bool(failed)):
      raise DataError(f"preparing the default corpus into {store} failed (see the message above)")
  common = dict(weights=list(cfg.data.weights) or None, seq_len=cfg.train.seq_len,
                global_batch=cfg.train.global_batch, seed=cfg.train.seed, process_index=jax.process_index(),
                process_count=jax.process_count(), packing=cfg.data.packing,
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
  check_same_shapes(ModelConfig.from_dict(meta["config"]["model"]), model_cfg)
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
  _say(f"warning: resuming on changed data (--allow_data_change): {what}")


def write_tokenizer(workdir, loader):
  """The workdir's tokenizer.model is the one its checkpoints were trained with (replaced with the data)."""
  path = workdir / TOKENIZER_FILE
  if process_zero() and (not path.exists() or path.read_bytes() != loader.tokenizer_bytes()):
    storage.write_atomic(path, loader.tokenizer_bytes())


def main(argv):
  """Runs `train`; a user error (bad config, path, storage or data store) is one line on stderr, exit 2."""
  del argv
  try:
    train()
  except Exception as error:  # pylint: disable=broad-except  # user errors become one line; others re-raise
    if FLAGS.verbose or not cli.is_user_error(error):
      raise
    print(f"error: {cli.describe(error)}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT_CODE)


def train():
  logging.set_verbosity(logging.WARNING)  # orbax and grain log every file at INFO; ours go through _say
  stop = StopRequest()
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
  if process_zero():
    (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))

  # ---- data ----------------------------------------------------------------------------------------------
  train_loader, val_loader = prepare_data(cfg, workdir)
  stop.exit_if_requested("while the data was prepared")

  # ---- mesh and state --------------------------------------------------------------------------------
  mesh = sharding.make_mesh(cfg.mesh)
  rules = {name: tuple(axes) for name, axes in cfg.rules}
  sharding.check_batch_divides(cfg.train.global_batch, cfg.train.grad_accum, mesh, rules)
  # Refuses, before anything compiles, a run predicted not to fit in a device's memory (yanjax/plan.py).
  plan.check_fits(cfg, jax.device_count(), jax.devices()[0].device_kind)
  abstract_model = nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model)
  schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
  optimizer = make_optimizer(cfg.optimizer, cfg.train.steps, decay_mask(abstract_params))
  state_sharding = train_state_shardings(abstract_params, optimizer, rules, mesh)
  init = jax.jit(lambda: init_train_state(model_cfg, optimizer, cfg.train.seed), out_shardings=state_sharding)
  report = sharding.replication_report(jax.eval_shape(init)["params"], state_sharding["params"])
  count = param_count(model_cfg)
  _say(f"mesh {dict(mesh.shape)}; parameters {count.total:,} total, {count.active:,} active per token; each "
       f"device holds {100 * report['fraction_per_device']:.1f}% of the parameter bytes "
       f"({report['fully_replicated_bytes']:,} bytes fully replicated)")

  # ---- checkpoint: resume or start ------------------------------------------------------------------
  checkpointer = Checkpointer(workdir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
  identity = data_identity(cfg, train_loader)
  restored = checkpointer.restore_latest(jax.eval_shape(init), lambda meta: check_resume(meta, model_cfg, identity))
  write_tokenizer(workdir, train_loader)
  if restored is None:
    state, start = init(), 0
  else:
    start, state, meta = restored
    saved_mesh = meta.get("mesh", dict(mesh.shape))
    _say(f"resumed from the checkpoint at step {start} in {workdir}" +
         (f" (saved on mesh {saved_mesh}, restored onto {dict(mesh.shape)})" if saved_mesh != dict(mesh.shape) else ""))

  # ---- loop ----------------------------------------------------------------------------------------
  batch_shard = sharding.batch_sharding(mesh, rules)
  train_step = jax.jit(sharding.with_activation_rules(make_train_step(
      graphdef, optimizer, schedule, cfg.train.grad_accum, cfg.train.z_loss_weight), mesh, rules),
                       in_shardings=(state_sharding, batch_shard), out_shardings=(state_sharding, None),
                       donate_argnums=0)
  eval_step = jax.jit(sharding.with_activation_rules(make_eval_step(graphdef), mesh, rules),
                      in_shardings=(state_sharding["params"], batch_shard))
  writer = MetricsWriter(workdir, enabled=process_zero(), resume_step=start)
  flops = flops_per_token(model_cfg, cfg.train.seq_len)
  device_kind = jax.devices()[0].device_kind

  def save(step):
    if step in checkpointer.steps():  # already saved at this step (a stop request on a checkpoint step)
      return
    meta = {"step": step, "data": {"next_step": step, "stores": store_paths(cfg, str(workdir)), "identity": identity},
            "config": cfg.to_dict(), "mesh": dict(mesh.shape), "process_count": jax.process_count()}
    checkpointer.save(step, state, meta)

  def evaluate():
    return eval_scalars([jax.device_get(eval_step(state["params"], to_global(val_loader.batch(i))))
                         for i in range(cfg.train.eval_batches)])

  def to_global(batch):
    return sharding.global_batch_array(batch, batch_shard, cfg.train.global_batch)

  stop.exit_if_requested("before the first step")
  progress = _progress_bar(start, cfg.train.steps)
  batches = iter(train_loader.iterate(start))
  pending, last_save = None, time.monotonic()
  exit_code = 0
  step = start
  with jax.transfer_guard("disallow" if cfg.train.transfer_guard else "allow"):
    while step < cfg.train.steps:
      with jax.transfer_guard("allow"):
        batch = to_global(next(batches))
      state, metrics = train_step(state, batch)
      step += 1
      if lease is not None:
        lease.renew()
      if step == start + 1:  # compiled by now: say whether the persistent cache had the step
        compilation_cache.report(_say)
      if pending is not None:  # metrics of the previous step: the host never waits on the step it dispatched
        exit_code = _after_step(pending, cfg, writer, progress, flops, device_kind)
      pending = (step, metrics)
      at_log = step % cfg.train.log_every == 0 or step == cfg.train.steps
      with jax.transfer_guard("allow"):
        if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
          scalars = evaluate()
          writer.write(step, scalars)
          _say(f"step {step}: validation loss {scalars['val_loss']:.4f}")
        timed_save = at_log and cfg.checkpoint.every_minutes > 0 and _agree(
            time.monotonic() - last_save > 60 * cfg.checkpoint.every_minutes)
        stopping = (exit_code == NONFINITE_EXIT_CODE or stop.preempted(step) or
                    ((at_log or jax.process_count() == 1) and stop.agreed()))
        if stopping or step % cfg.checkpoint.every_steps == 0 or timed_save or step == cfg.train.steps:
          # The saved step's metrics go out with it: a run resumed from this checkpoint logs from step + 1.
          exit_code = _after_step(pending, cfg, writer, progress, flops, device_kind, force=True) or exit_code
          pending = None
          writer.flush()
          save(step)
          last_save = time.monotonic()
        if stopping:
          exit_code = exit_code or PREEMPTED_EXIT_CODE
          break
  with jax.transfer_guard("allow"):
    if pending is not None and exit_code == 0:
      exit_code = _after_step(pending, cfg, writer, progress, flops, device_kind, force=True)
    progress.close()
    if exit_code == 0 and cfg.train.sample_tokens > 0:
      write_sample(graphdef, state["params"], cfg.train, workdir)
    compilation_cache.report(_say)
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  if exit_code:
    logging.warning("stopped at step %d (exit code %d); re-run the same command to resume", step, exit_code)
    sys.exit(exit_code)


def write_sample(graphdef, params, train_cfg, workdir):
  """Generates a continuation of train.sample_prompt (sampled, seeded), prints it and writes sample.txt.

  Generation runs on the sharded parameters as they are (every process takes part in the jitted loop);
  nothing is gathered onto one host.
  """
  import sentencepiece  # pylint: disable=import-outside-toplevel
  from yanjax.generate import generate  # pylint: disable=import-outside-toplevel
  from yanjax.sampling import Sampling  # pylint: disable=import-outside-toplevel
  tokenizer = sentencepiece.SentencePieceProcessor(model_proto=(workdir / TOKENIZER_FILE).read_bytes())
  prompt = [tokenizer.bos_id()] + tokenizer.encode(train_cfg.sample_prompt)
  model = nnx.merge(graphdef, params)
  completion = generate(model, [prompt], max_new_tokens=train_cfg.sample_tokens,
                        sampling=Sampling(temperature=0.7, top_p=0.9), eos_id=tokenizer.eos_id(),
                        seed=train_cfg.seed)[0]
  if not process_zero():
    return
  text = tokenizer.decode(prompt[1:] + completion.tokens)
  (workdir / "sample.txt").write_text(text + "\n")
  print(f"---- sample ({train_cfg.sample_tokens} tokens, temperature 0.7, top-p 0.9) ----\n{text}\n----",
        flush=True)


def _after_step(pending, cfg, writer, progress, flops, device_kind, force=False) -> int:
  """Logs the metrics of a finished step; returns NONFINITE_EXIT_CODE when nan_policy says stop."""
  step, metrics = pending
  with jax.transfer_guard("allow"):
    skipped = float(jax.device_get(metrics["skipped"]))
    now = time.perf_counter()
    progress.update(step - progress.n)
    if skipped:
      logging.warning("step %d: non-finite loss or gradients, update skipped", step)
      if cfg.train.nan_policy == "stop":
        return NONFINITE_EXIT_CODE
    if step % cfg.train.log_every and not force:
      return 0
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    elapsed = now - progress.last_log_time
    steps_done = step - progress.last_log_step
    tokens_per_s = values["tokens"] * steps_done / max(elapsed, 1e-9)
    progress.last_log_time, progress.last_log_step = now, step
    utilisation = mfu(flops, tokens_per_s, jax.device_count(), device_kind)
    values.update({"perplexity": float(np.exp(min(values["loss"], 50.0))), "tokens_per_s": tokens_per_s,
                   "step_time_s": elapsed / max(steps_done, 1), "mfu": "n/a" if utilisation is None else utilisation})
    writer.write(step, values)
    progress.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
  return 0


def _say(message: str):
  """Prints on process 0 without breaking the progress bar."""
  if process_zero():
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    tqdm.write(message)


def _agree(local: bool) -> bool:
  """Process 0's decision, on every process."""
  if jax.process_count() == 1:
    return local
  return bool(multihost_utils.broadcast_one_to_all(np.array(local)))


def _progress_bar(start: int, total: int):
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not process_zero(), dynamic_ncols=True)
  bar.last_log_time, bar.last_log_step = time.perf_counter(), start
  return bar


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad --config or --config.<key> override as one line (exit 2)."""
  try:
    remaining = FLAGS(argv)
    FLAGS.config.keys()  # config_flags defers a config file's load error to the first access
    return remaining
  except Exception as error:  # pylint: disable=broad-except  # config_flags raises what the override hit
    print(f"error: {_describe_flag_error(argv, error)}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT_CODE)


def _describe_flag_error(argv: list[str], error: Exception) -> str:
  """Names the --config.<key> override whose key the config does not have, else restates `error`."""
  from yanjax.config import load_config_file  # pylint: disable=import-outside-toplevel
  config = ([a.split("=", 1)[1] for a in argv if a.startswith("--config=")] or ["configs/yan_tiny.py"])[-1]
  try:
    base = load_config_file(config)
  except Exception as load_error:  # pylint: disable=broad-except
    return f"--config={config}: {load_error}"
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    node = base
    keys = arg[len("--config."):].split("=", 1)[0].split(".")
    for depth, key in enumerate(keys):
      if not hasattr(node, "keys") or key not in node.keys():
        section = ".".join(keys[:depth]) or "the config"
        known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none (not a section)"
        return f"{arg}: {section} has no key {key!r}; its keys are {known}"
      node = node[key]
  reason = " ".join(str(error).split())
  return f"{type(error).__name__}: {reason}; check the flags (python -m yanjax.train --helpfull)"


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
