"""Scaling-law sweeps: run a grid of model sizes x token budgets (or IsoFLOP budgets), collect, fit, plot.

  python -m yanjax.main.sweep run    --spec configs/sweeps/tiny.py --out runs/sweep_tiny   # points one after another
  python -m yanjax.main.sweep launch --spec configs/sweeps/tiny.py --out runs/sweep_tiny   # writes a SLURM job array
  python -m yanjax.main.sweep fit    --out runs/sweep_tiny                                 # fit + figures

A spec is a Python file whose `get_sweep()` returns a dict:
  families  {family name: config spec},
            e.g. {"yan": "configs/yan_tiny.py", "attention": "configs/yan_tiny.py:attention"}
  sizes     {size name: overrides of the *Yan* model}; each family's model is derived from the overridden Yan
            model (so the attention baseline stays parameter-matched at every size)
  tokens    token budgets D (every size trains on each), and/or
  isoflop   FLOP budgets C (every size trains on D = C / FLOPs-per-token tokens)
  config    {section: {key: value}} shared by every point (train, optimizer, data, ...)
Each point trains in its own workdir <out>/points/<id> (re-running resumes or skips it) and writes result.json;
<out>/results.jsonl is rebuilt from those, one record per finished point (the format docs/scaling.md reads).
`fit` writes results.jsonl and <out>/fits/ only when the fit succeeds: with no finished point, or too few for
the laws (yanjax.scaling.fit), it is refused in one line (exit code 2) and leaves the earlier files as they are.
--out (and --spec) may be local paths or gs:// / s3:// URLs. SIGTERM / SIGINT: passed on to the running trainer,
which saves; the sweep starts no further point and exits with the trainer's PREEMPTED_EXIT_CODE.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import shlex
import signal
import string
import subprocess
import sys
import tempfile
import types
from typing import Any, NamedTuple

from etils import epath

from yanjax.core import lifetime, storage
from yanjax.core.cli import PREEMPTED_EXIT_CODE
from yanjax.core.config import ConfigError, load_config_file, syntax_error
from yanjax.model.counting import flops_per_token, param_count
from yanjax.training.presets import model_variant

# The job-array template (repo-internal, not a user path): `launch` fills it in.
LAUNCH_DIR = pathlib.Path(__file__).resolve().parents[2] / "launch"
ARRAY_TEMPLATE = LAUNCH_DIR / "sweep_array.sbatch"
FAILED_EXIT_CODE = 1


class Point(NamedTuple):
  id: str
  family: str
  size: str
  flags: list[str]  # trainer flags after --workdir
  params: int
  active_params: int
  tokens: int
  flops: float
  flop_budget: float | None


def load_spec(path: str | os.PathLike) -> dict[str, Any]:
  """Runs a spec file (local or gs:// / s3://) and returns its checked `get_sweep()`."""
  path = storage.as_path(path)
  module = types.ModuleType("yanjax_sweep_spec")
  module.__file__ = os.fspath(path)
  try:
    code = compile(path.read_text(), os.fspath(path), "exec")
  except SyntaxError as error:
    raise syntax_error(error) from None
  exec(code, module.__dict__)  # pylint: disable=exec-used
  sweep = module.get_sweep()
  unknown = set(sweep) - {"families", "sizes", "tokens", "isoflop", "config"}
  if unknown:
    raise ConfigError(f"sweep spec {path}: unknown key(s) {sorted(unknown)}")
  if not sweep.get("tokens") and not sweep.get("isoflop"):
    raise ConfigError(f"sweep spec {path}: give token budgets ('tokens') and/or FLOP budgets ('isoflop')")
  return sweep


def points(sweep: dict[str, Any]) -> list[Point]:
  """Every (family, size, budget) point of the grid, in a fixed order."""
  out = []
  for family, config_spec in sweep["families"].items():
    path, _, variant = config_spec.partition(":")
    base = load_config_file(path)
    for section, values in sweep.get("config", {}).items():
      base[section].update(values)
    train = base.train
    tokens_per_step = train.global_batch * train.seq_len
    for size, overrides in sweep["sizes"].items():
      try:
        model = model_variant({**base.model.to_dict(), **overrides}, variant, train.seq_len)
      except ConfigError as e:
        raise ConfigError(f"sweep family {family!r} ({config_spec}) at size {size!r}: {e}") from None
      fpt = flops_per_token(model, train.seq_len)
      budgets = [(d, None) for d in sweep.get("tokens", ())]
      budgets += [(c / fpt, c) for c in sweep.get("isoflop", ())]
      for tokens, budget in budgets:
        steps = max(1, math.ceil(tokens / tokens_per_step))
        point_id = f"{family}-{size}-" + (f"C{budget:.3g}" if budget else f"D{tokens:.3g}")
        flags = [f"--config={path}"] + _section_flags(sweep.get("config", {})) + [
            f"--config.model.{k}={v}" for k, v in model.to_dict().items()] + [
            f"--config.train.steps={steps}", "--config.train.tokens=0",
            f"--config.optimizer.warmup_steps={min(base.optimizer.warmup_steps, steps // 10)}",
            f"--config.train.eval_every={steps}", f"--config.checkpoint.every_steps={steps}",
            "--config.train.sample_tokens=0"]
        count = param_count(model)
        out.append(Point(point_id, family, size, flags, count.total, count.active, steps * tokens_per_step,
                         fpt * steps * tokens_per_step, budget))
  return out


def _section_flags(config: dict[str, dict[str, Any]]) -> list[str]:
  return [f"--config.{section}.{key}={value!r}" if isinstance(value, tuple) else
          f"--config.{section}.{key}={value}" for section, values in config.items() for key, value in values.items()]


class StopRequest:
  """SIGTERM / SIGINT while points run: recorded, and passed on to the running trainer (which saves)."""

  def __init__(self):
    self.signal = None
    self.trainer: subprocess.Popen | None = None

  def _handle(self, signum, _frame):
    self.signal = signum
    if self.trainer is not None and self.trainer.poll() is None:
      self.trainer.send_signal(signum)

  @contextlib.contextmanager
  def installed(self):
    previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)


def run_point(point: Point, out: epath.Path, stop: StopRequest | None = None) -> int:
  """Trains one point (resuming its workdir) and writes its result.json.

  Returns 0 when the point has its result, the trainer's PREEMPTED_EXIT_CODE when a signal stopped it (it
  saved; a re-run resumes), FAILED_EXIT_CODE otherwise.
  """
  stop = stop or StopRequest()
  workdir = out / "points" / point.id
  result_file = workdir / "result.json"
  if result_file.exists():
    print(f"[sweep] {point.id}: done already, skipped", flush=True)
    return 0
  print(f"[sweep] {point.id}: training {point.tokens:,} tokens, {point.params:,} parameters", flush=True)
  workdir.mkdir(parents=True, exist_ok=True)
  with _train_log(workdir / "train.log") as log:
    stop.trainer = subprocess.Popen([sys.executable, "-m", "yanjax.main.train", f"--workdir={workdir}", *point.flags],
                                    stdout=log, stderr=subprocess.STDOUT, env=lifetime.child_environment())
    if stop.signal is not None:  # arrived while the trainer was starting
      stop.trainer.send_signal(stop.signal)
    try:
      code = stop.trainer.wait()
    finally:
      stop.trainer = None
  if code == PREEMPTED_EXIT_CODE or (stop.signal is not None and code != 0):
    print(f"[sweep] {point.id}: stopped by a signal (exit code {code}); a re-run resumes it", flush=True)
    return PREEMPTED_EXIT_CODE
  val_loss = _final_val_loss(workdir / "metrics.jsonl")
  if code != 0 or val_loss is None or not math.isfinite(val_loss):
    print(f"[sweep] {point.id}: FAILED (exit code {code}, validation loss {val_loss}); see {workdir}/train.log",
          flush=True)
    return FAILED_EXIT_CODE
  record = {"id": point.id, "family": point.family, "size": point.size, "params": point.params,
            "active_params": point.active_params, "tokens": point.tokens, "flops": point.flops,
            "val_loss": val_loss, "flop_budget": point.flop_budget}
  storage.write_atomic(result_file, json.dumps(record))
  print(f"[sweep] {point.id}: validation loss {val_loss:.4f}", flush=True)
  return 0


@contextlib.contextmanager
def _train_log(path: epath.Path):
  """A local file for the trainer's output, appended to `path` (at exit, in one upload, when `path` is remote)."""
  if not storage.is_remote(path):
    with open(path, "a", encoding="utf-8") as log:
      yield log
    return
  with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
    try:
      yield log
    finally:
      log.seek(0)
      path.write_text((path.read_text() if path.exists() else "") + log.read())


def _final_val_loss(metrics: epath.Path) -> float | None:
  if not metrics.exists():
    return None
  losses = [json.loads(line)["val_loss"] for line in metrics.read_text().splitlines() if '"val_loss"' in line]
  return losses[-1] if losses else None


def _results(out: epath.Path) -> dict[epath.Path, str]:
  """{path: text} of every finished point's result.json, in order of point id."""
  return {p: p.read_text() for p in sorted((out / "points").glob("*/result.json"))}


def _write_results(out: epath.Path, texts) -> epath.Path:
  path = out / "results.jsonl"
  storage.write_atomic(path, "".join(r + "\n" for r in texts))
  return path


def collect(out: epath.Path) -> epath.Path:
  """Rebuilds <out>/results.jsonl from every finished point's result.json."""
  return _write_results(out, _results(out).values())


def fit_sweep(out: epath.Path, grid: str = "coarse", n_boot: int = 100) -> None:
  """Fits the finished points; writes <out>/results.jsonl and <out>/fits/ only when the fit succeeds.

  Raises ConfigError (a FitError when the points are too few for the laws) before anything is written.
  """
  from yanjax.scaling import fit as scaling_fit  # pylint: disable=import-outside-toplevel  # scipy, matplotlib
  points_dir = out / "points"
  kept = "results.jsonl and fits/ are left as they were"
  if not storage.check_readable(points_dir, "sweep fit: points directory", "give the --out of a sweep"):
    raise ConfigError(f"sweep fit: {points_dir} does not exist, so there is nothing to fit ({kept}); give "
                      "the --out of a sweep that has run")
  texts = _results(out)
  if not texts:
    raise ConfigError(f"sweep fit: no finished point under {points_dir} (no */result.json; {kept}); run "
                      "points first with `python -m yanjax.main.sweep run`")
  records = []
  for path, text in texts.items():
    try:
      records.append(json.loads(text))
    except ValueError as e:
      raise ConfigError(f"sweep fit: {path} is not a JSON result ({e}; {kept}); delete it and re-run that "
                        "point") from e
  storage.check_writable(out, "sweep --out", "give a directory (or bucket URL) this machine can write")
  try:
    fits = scaling_fit.fit_families(scaling_fit.group_by_family(records), grid, n_boot)
  except scaling_fit.FitError as e:
    raise scaling_fit.FitError(f"sweep fit refused with {len(records)} finished point(s) under {points_dir}: "
                               f"{e} ({kept})") from e
  written = scaling_fit.write_fits(fits, out / "fits")
  scaling_fit.report(fits, [_write_results(out, texts.values()), *written])


def write_slurm_array(spec: epath.Path, out: epath.Path, count: int, script: epath.Path) -> epath.Path:
  """Fills launch/sweep_array.sbatch: a Slurm job array, task i running `sweep run --only i`; writes `script`.

  `script` and its task logs (slurm-<job>_<task>.log beside it) are local: sbatch reads the one and Slurm
  writes the others. Paths in it are absolute (or URLs).
  """
  text = string.Template(ARRAY_TEMPLATE.read_text()).substitute(
      last_index=count - 1, log_dir=script.parent, script=shlex.quote(os.fspath(script)),
      spec=shlex.quote(os.fspath(spec)), out=shlex.quote(os.fspath(out)), cwd=shlex.quote(os.getcwd()),
      launch_dir=shlex.quote(os.fspath(LAUNCH_DIR)))
  script.parent.mkdir(parents=True, exist_ok=True)
  script.write_text(text)
  return script
