"""The trainer's hooks: metrics, evaluation, checkpoints, profiling and the end-of-run sample.

Each is a callable `hook(info: StepInfo)` that yanjax/training/loop.py calls at the interval it was added with; the
trainer (yanjax/main/train.py) adds them in this order, which matters: the metrics of a step are logged before a
checkpoint of it, and the stop check (yanjax/training/stop.py) runs before the checkpoint that saves on a stop.
"""

from __future__ import annotations

import collections
import pathlib
import shutil
import tempfile
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from yanjax.core import storage
from yanjax.core.errors import UserError
from yanjax.model.config import ModelConfig
from yanjax.model.counting import flops_per_token
from yanjax.training import compilation_cache
from yanjax.training.hosts import process_zero, say
from yanjax.training.loop import StepInfo
from yanjax.training.metrics import mfu
from yanjax.training.train_step import eval_scalars, with_target_bytes
from yanjax.training.trainer import Trainer
from yanjax.training.writers import Writers

NONFINITE_EXIT_CODE = 3  # nan_policy="stop": saved and stopped on a non-finite loss


class LossMonitor:
  """Counts a run's skipped steps (non-finite loss or gradients) and loss spikes: losses above `factor` x
  the median of the `window` finite losses before them (judged once `window` losses were seen).

  Its `state()` goes into each checkpoint's metadata, so a resumed run counts on as the uninterrupted one.
  """

  def __init__(self, window: int, factor: float, skipped_steps: int = 0, loss_spikes: int = 0,
               recent_losses: tuple[float, ...] = ()):
    self.factor = factor
    self.skipped_steps, self.loss_spikes = skipped_steps, loss_spikes
    self.recent = collections.deque(recent_losses, maxlen=window)

  def update(self, loss: float, skipped: bool) -> float | None:
    """Counts one step; returns the median `loss` exceeded when it is a spike, else None."""
    if skipped:
      self.skipped_steps += 1
      return None
    median = float(np.median(self.recent)) if len(self.recent) == self.recent.maxlen else None
    self.recent.append(loss)
    if median is not None and loss > self.factor * median:
      self.loss_spikes += 1
      return median
    return None

  def counters(self) -> dict[str, int]:
    return {"skipped_steps": self.skipped_steps, "loss_spikes": self.loss_spikes}

  def state(self) -> dict:
    return {**self.counters(), "recent_losses": list(self.recent)}


class MetricsLogger:
  """Logs each step's metrics one step late, so the host never waits on the step it just dispatched.

  At every step (add it with every=1): the progress bar, the non-finite check (`train.nan_policy`) and the
  loss monitor. Every `train.log_every` steps, and for the step a checkpoint saves (`flush`): loss,
  perplexity, gradient norm, learning rate, tokens/s, step time, MFU, the monitor's counters and the step's
  other metrics, to the writers. `close` (at_end) logs what is left and closes the writers.
  """

  def __init__(self, writers: Writers, train_cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, start: int,
               monitor: LossMonitor):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    self.writers, self.train_cfg, self.monitor = writers, train_cfg, monitor
    self.flops = flops_per_token(model_cfg, train_cfg.seq_len)
    self.device_kind = jax.devices()[0].device_kind
    self.progress = tqdm(total=train_cfg.steps, initial=start, desc="train", unit="step",
                         disable=not process_zero(), dynamic_ncols=True)
    self.last_log_time, self.last_log_step = time.perf_counter(), start
    self.pending = None  # (step, metrics) of the step dispatched last, not logged yet

  def __call__(self, info: StepInfo):
    if self.pending is not None:
      info.exit_code = self._log(*self.pending) or info.exit_code
    self.pending = (info.step, info.metrics)

  def flush(self, info: StepInfo):
    """Logs the pending step now and makes the writers durable (before a checkpoint of it)."""
    if self.pending is not None:
      info.exit_code = self._log(*self.pending, force=True) or info.exit_code
      self.pending = None
    self.writers.flush()

  def close(self, info: StepInfo):
    if self.pending is not None and info.exit_code == 0:
      self._log(*self.pending, force=True)
    self.progress.close()
    self.writers.close()

  def _log(self, step: int, metrics: dict, force: bool = False) -> int:
    """Logs a finished step; returns NONFINITE_EXIT_CODE when nan_policy says stop, else 0."""
    skipped, loss = (float(x) for x in jax.device_get((metrics["skipped"], metrics["loss"])))
    now = time.perf_counter()
    self.progress.update(step - self.progress.n)
    spike_median = self.monitor.update(loss, bool(skipped))
    if skipped:
      logging.warning("step %d: non-finite loss or gradients, update skipped", step)
      if self.train_cfg.nan_policy == "stop":
        return NONFINITE_EXIT_CODE
    elif spike_median is not None:
      logging.warning("step %d: loss spike: %.4f is over %g x the median %.4f of the last %d losses", step, loss,
                      self.monitor.factor, spike_median, self.train_cfg.spike_window)
    if step % self.train_cfg.log_every and not force:
      return 0
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    elapsed = now - self.last_log_time
    steps_done = step - self.last_log_step
    tokens_per_s = values["tokens"] * steps_done / max(elapsed, 1e-9)
    self.last_log_time, self.last_log_step = now, step
    utilisation = mfu(self.flops, tokens_per_s, jax.device_count(), self.device_kind)
    values.update({"perplexity": float(np.exp(min(values["loss"], 50.0))), "tokens_per_s": tokens_per_s,
                   "step_time_s": elapsed / max(steps_done, 1), "mfu": "n/a" if utilisation is None else utilisation,
                   **self.monitor.counters()})
    self.writers.write(step, values)
    self.progress.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
    return 0


class Evaluate:
  """Validation loss, bits per byte (the tokenizer's `token_bytes` [V] count the text) and each selective
  layer's router statistics on the first `eval_batches` validation batches, written and printed. Add it with
  every=train.eval_every."""

  def __init__(self, trainer: Trainer, loader, eval_batches: int, writers: Writers, token_bytes: np.ndarray):
    self.trainer, self.loader, self.eval_batches, self.writers = trainer, loader, eval_batches, writers
    self.token_bytes = token_bytes

  def __call__(self, info: StepInfo):
    batches = (with_target_bytes(self.loader.batch(i), self.token_bytes) for i in range(self.eval_batches))
    scalars = eval_scalars([jax.device_get(self.trainer.eval_step(info.state["params"], self.trainer.to_global(b)))
                            for b in batches])
    self.writers.write(info.step, scalars)
    say(f"step {info.step}: validation loss {scalars['val_loss']:.4f}, "
        f"{scalars['val_bits_per_byte']:.4f} bits per byte")


class SaveCheckpoint:
  """Saves the train state (asynchronously) with the metadata `meta(step)`. The last save is waited for first,
  so a full disk under it is reported (DiskFullError) and its partial files removed before more is written;
  then the saved step's metrics go out: a run resumed from the checkpoint logs from the step after it. Add it with
  every=checkpoint.every_steps, seconds=60 * checkpoint.every_minutes, at_stop=True; `close` at the end."""

  def __init__(self, checkpointer, logger: MetricsLogger, meta: Callable[[int], dict]):
    self.checkpointer, self.logger, self.meta = checkpointer, logger, meta

  def __call__(self, info: StepInfo):
    try:
      self.checkpointer.wait()  # the last save's full disk is reported (and its partial files removed) first
      self.logger.flush(info)
      if info.step not in self.checkpointer.steps():  # already saved at this step (a stop on a checkpoint step)
        self.checkpointer.save(info.step, info.state, self.meta(info.step))
    except UserError:  # a full disk: its one line goes below the progress bar, not at the end of it
      self.logger.progress.close()
      raise

  def close(self, _info: StepInfo):
    """Waits for the last save to commit."""
    self.checkpointer.wait()
    self.checkpointer.close()


class Profile:
  """A `jax.profiler` trace of steps `first` .. `first + steps - 1` in <workdir>/profile, viewed with
  TensorBoard's profile plugin (`tensorboard --logdir <workdir>/profile`) or Perfetto (the .trace.json.gz).

  Traces the devices of the process it runs on (the trainer adds it on process 0 only). Add it with every=1
  and at_end=True (a run that stops inside the window ends the trace there). On a bucket the trace is
  written to a local temporary directory and copied up when it ends.
  """

  def __init__(self, workdir, first: int, steps: int):
    self.directory = storage.as_path(workdir) / "profile"
    self.first, self.last = first, first + steps - 1
    self.tracing_into = None  # the local directory of the running trace

  def __call__(self, info: StepInfo):
    if info.step == self.first - 1:
      jax.block_until_ready(info.metrics)  # the trace starts with step `first`
      self.tracing_into = tempfile.mkdtemp() if storage.is_remote(self.directory) else str(self.directory)
      jax.profiler.start_trace(self.tracing_into)
    elif info.step == self.last:
      self.close(info)

  def close(self, info: StepInfo):
    if self.tracing_into is None:
      return
    jax.block_until_ready(info.metrics)
    jax.profiler.stop_trace()
    if storage.is_remote(self.directory):
      local = pathlib.Path(self.tracing_into)
      for path in (p for p in local.rglob("*") if p.is_file()):
        target = self.directory / path.relative_to(local).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
      shutil.rmtree(local)
    self.tracing_into = None
    say(f"profile of steps {self.first}-{info.step} in {self.directory}")


class Sample:
  """At the end of a run that finished (exit code 0): a sampled (seeded) continuation of
  `train.sample_prompt`, printed and written to <workdir>/sample.txt. Add it with at_end=True.

  Generation runs on the sharded parameters as they are (every process takes part in the jitted loop);
  nothing is gathered onto one host.
  """

  def __init__(self, graphdef, train_cfg: ml_collections.ConfigDict, workdir):
    self.graphdef, self.train_cfg, self.workdir = graphdef, train_cfg, workdir

  def __call__(self, info: StepInfo):
    if info.exit_code:
      return
    from yanjax.data import tokenizer as tokenization  # pylint: disable=import-outside-toplevel
    from yanjax.inference.generate import generate  # pylint: disable=import-outside-toplevel
    from yanjax.inference.sampling import Sampling  # pylint: disable=import-outside-toplevel
    train_cfg = self.train_cfg
    path = tokenization.find_file(self.workdir)  # written by the trainer before the first step
    tokenizer = tokenization.read(path)
    prompt = [tokenizer.bos_id] + tokenizer.encode(train_cfg.sample_prompt)
    model = nnx.merge(self.graphdef, info.state["params"])
    completion = generate(model, [prompt], max_new_tokens=train_cfg.sample_tokens,
                          sampling=Sampling(temperature=0.7, top_p=0.9), eos_id=tokenizer.eos_id,
                          seed=train_cfg.seed, vocab_limit=tokenizer.vocab_size)[0]
    if not process_zero():
      return
    text = tokenizer.decode(prompt[1:] + completion.tokens)
    (self.workdir / "sample.txt").write_text(text + "\n")
    print(f"---- sample ({train_cfg.sample_tokens} tokens, temperature 0.7, top-p 0.9) ----\n{text}\n----",
          flush=True)


def report_compilation(info: StepInfo):
  """After the run's first step (compiled by then): whether JAX's persistent cache held the programs."""
  if info.step == info.start + 1:
    compilation_cache.report(say)
