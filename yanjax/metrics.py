"""Training metrics: MFU from the model's FLOPs formula, and a writer to JSONL + TensorBoard (process 0 only)."""

from __future__ import annotations

import json
import time
from typing import Any

import jax

from yanjax import storage

# Dense bfloat16 peak FLOP/s per device, from vendor data sheets (no sparsity). MFU divides by these.
PEAK_FLOPS = {
    "H100": 989e12,  # H100 SXM
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  """Peak of the longest table key contained in the device kind (e.g. 'NVIDIA H100 80GB HBM3'), else None."""
  matches = [key for key in PEAK_FLOPS if key.lower() in device_kind.lower()]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


def mfu(flops_per_token: float, tokens_per_second: float, num_devices: int, device_kind: str) -> float | None:
  """Model FLOPs utilisation: achieved training FLOP/s over the devices' summed peak; None when unknown."""
  peak = peak_flops(device_kind)
  if peak is None:
    return None
  return flops_per_token * tokens_per_second / (peak * num_devices)


class MetricsWriter:
  """Writes scalars to <workdir>/metrics.jsonl and TensorBoard events under <workdir>/tensorboard.

  The workdir may be local or a bucket. Local files are appended and flushed at every record; an object
  store has no append, so there the whole file is rewritten (one upload) at most every `flush_seconds`
  and at `close`. Opening with `resume_step` drops the records of steps after it (a run killed after its
  last checkpoint logged steps that the resumed run does again), so each step is in the file once.
  """

  def __init__(self, workdir, enabled: bool = True, resume_step: int = 0, flush_seconds: float = 30.0):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    workdir = storage.as_path(workdir)
    self.path = workdir / "metrics.jsonl"
    self.remote = storage.is_remote(workdir)
    self.flush_seconds = flush_seconds
    self.last_flush = time.monotonic()
    kept = [line for line in (self.path.read_text().splitlines() if self.path.exists() else [])
            if line.strip() and json.loads(line).get("step", 0) <= resume_step]
    self.lines = kept
    self._rewrite()
    self.jsonl = None if self.remote else self.path.open("a")
    self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))

  def _rewrite(self):
    self.path.write_text("".join(line + "\n" for line in self.lines))
    self.last_flush = time.monotonic()

  def write(self, step: int, scalars: dict[str, Any]):
    if not self.enabled:
      return
    record = {"step": step, "time": time.time()}
    for name, value in scalars.items():
      value = value if value is None or isinstance(value, str) else float(value)
      record[name] = value
      if isinstance(value, float):
        self.tensorboard.add_scalar(name, value, step)
    line = json.dumps(record)
    self.lines.append(line)
    if self.jsonl is not None:
      self.jsonl.write(line + "\n")
      self.jsonl.flush()
    elif time.monotonic() - self.last_flush > self.flush_seconds:
      self._rewrite()

  def flush(self):
    """Makes every record so far durable (an upload on object stores)."""
    if self.enabled:
      if self.jsonl is None:
        self._rewrite()
      self.tensorboard.flush()

  def close(self):
    if self.enabled:
      self.flush()
      if self.jsonl is not None:
        self.jsonl.close()
      self.tensorboard.close()


def process_zero() -> bool:
  return jax.process_index() == 0
