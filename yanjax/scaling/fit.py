"""Scaling-law fits to a sweep's results: Chinchilla approaches 2 and 3, with bootstrap intervals.

Approach 3 fits L(N, D) = E + A / N^alpha + B / D^beta to every run; approach 2 fits a parabola in log N to
each IsoFLOP profile and a power law through the parabolas' minima (Hoffmann et al. 2022). docs/scaling.md
gives the formulas, the fitting details and how to read the figures.

  python -m yanjax.scaling.fit --results results.jsonl --out fits/

Both paths may be local or gs:// / s3:// URLs. Shapes: `n` = runs, `s` = starting points, `k` = FLOP budgets.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

# Set before numpy loads OpenBLAS, unless the caller chose: L-BFGS-B makes thousands of tiny BLAS calls a
# fit, and waking OpenBLAS's threads for each costs more than the call (9x slower on 2 busy shared cores).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy import optimize

from yanjax import storage
from yanjax.scaling import plot

REQUIRED_KEYS = ("family", "params", "tokens", "flops", "val_loss")
LAW_NAMES = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3


# ---------------------------------------------------------------------------------------------------------
# Results records.


@dataclasses.dataclass(frozen=True)
class Runs:
  """One family's training runs as arrays [n]; `budget` is NaN for runs outside an IsoFLOP sweep."""

  params: np.ndarray  # N
  tokens: np.ndarray  # D
  flops: np.ndarray  # C
  loss: np.ndarray  # final validation loss
  budget: np.ndarray  # nominal IsoFLOP budget C, or NaN

  @classmethod
  def from_records(cls, records: Sequence[dict[str, Any]]) -> Runs:
    """Arrays from result records; `params`, `tokens`, `flops`, `val_loss` must be positive and finite."""
    for i, record in enumerate(records):
      bad = [k for k in REQUIRED_KEYS[1:] if not 0 < _number(record.get(k)) < math.inf]
      if bad:
        raise ValueError(f"record {i} of family {record.get('family')!r}: {', '.join(bad)} missing, "
                         f"non-positive or not finite: {record}")

    def column(key):
      return np.array([_number(r.get(key)) for r in records], dtype=np.float64)

    return cls(column("params"), column("tokens"), column("flops"), column("val_loss"), column("flop_budget"))

  def __len__(self) -> int:
    return len(self.loss)

  def take(self, idx: np.ndarray) -> Runs:
    """The runs at indices `idx` (repeats allowed, as a bootstrap resample needs)."""
    return Runs(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))


def _number(value: Any) -> float:
  return math.nan if value is None or value == "" else float(value)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads result records from JSONL (one object a line) or CSV (a header row), local or in a bucket."""
  path = storage.as_path(path)
  text = path.read_text()
  if path.suffix == ".csv":
    return list(csv.DictReader(io.StringIO(text, newline="")))
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def group_by_family(records: Sequence[dict[str, Any]]) -> dict[str, Runs]:
  """Runs per family, in order of first appearance."""
  families: dict[str, list[dict[str, Any]]] = {}
  for i, record in enumerate(records):
    if record.get("family") in (None, ""):
      raise ValueError(f"record {i} has no family: {record}")
    families.setdefault(str(record["family"]), []).append(record)
  return {name: Runs.from_records(rs) for name, rs in families.items()}


def load_results(path: str | os.PathLike) -> dict[str, Runs]:
  """Reads a sweep's JSONL or CSV results file into runs per family."""
  return group_by_family(read_records(path))


# ---------------------------------------------------------------------------------------------------------
# Approach 3: the parametric law.


@dataclasses.dataclass(frozen=True)
class Law:
  """L(N, D) = E + A / N^alpha + B / D^beta and its compute-optimal frontier under C = 6 N D."""

  E: float
  A: float
  B: float
  alpha: float
  beta: float

  @classmethod
  def from_theta(cls, theta: Sequence[float]) -> Law:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return cls(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)

  @property
  def theta(self) -> np.ndarray:
    """The fit's coordinates [5]: (a, b, e, alpha, beta) = (ln A, ln B, ln E, alpha, beta)."""
    return np.array([math.log(self.A), math.log(self.B), math.log(self.E), self.alpha, self.beta])

  def loss(self, n, d):
    return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

  @property
  def a(self) -> float:
    """Exponent of N*(C)."""
    return self.beta / (self.alpha + self.beta)

  @property
  def b(self) -> float:
    """Exponent of D*(C)."""
    return self.alpha / (self.alpha + self.beta)

  @property
  def G(self) -> float:
    return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

  def n_opt(self, c):
    """Compute-optimal parameters N*(C) = G (C/6)^a."""
    return self.G * np.power(np.asarray(c, dtype=np.float64) / 6.0, self.a)

  def d_opt(self, c):
    """Compute-optimal tokens D*(C) = G^-1 (C/6)^b."""
    return np.power(np.asarray(c, dtype=np.float64) / 6.0, self.b) / self.G

  def loss_opt(self, c):
    """Frontier loss L*(C) = L(N*(C), D*(C))."""
    return self.loss(self.n_opt(c), self.d_opt(c))

  def summary(self) -> dict[str, float]:
    """The five parameters and the frontier's a, b, G, for fit.json and the bootstrap."""
    return {**dataclasses.asdict(self), "a": self.a, "b": self.b, "G": self.G}


def init_grid(coarse: bool = False) -> np.ndarray:
  """Starting points [s, 5] as (a, b, e, alpha, beta), a = log A, b = log B, e = log E.

  Chinchilla's grid: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}
  (4,500 points); `coarse` keeps every other value of each (3 x 3 x 3 x 3 x 3 = 243 points).
  """
  exps, es, abs_ = np.linspace(0, 2, 5), np.linspace(-1, 1, 5), np.linspace(0, 25, 6)
  if coarse:
    exps, es, abs_ = exps[::2], es[::2], abs_[::2]
  return np.array([(a, b, e, al, be) for a, b, e, al, be in itertools.product(abs_, abs_, es, exps, exps)])


def huber_objective(theta, log_n, log_d, log_l, delta=HUBER_DELTA):
  """Mean Huber loss of log L_pred - log L_obs, divided by delta^2, and its gradient [5].

  log L_pred = logsumexp(a - alpha log N, b - beta log D, e). The division only rescales: it keeps the
  objective O(1) so L-BFGS-B's stopping tests do not end the fit early (Besiroglu et al. 2024).
  """
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # [3, n]
  top = terms.max(axis=0)
  pred = top + np.log(np.exp(terms - top).sum(axis=0))
  w = np.exp(terms - pred)  # [3, n] softmax weights: d pred / d term
  r = pred - log_l
  huber = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
  scale = 1.0 / (len(r) * delta * delta)
  g = np.clip(r, -delta, delta) * scale  # d objective / d pred
  grad = np.array([g @ w[0], g @ w[1], g @ w[2], -(g * w[0]) @ log_n, -(g * w[1]) @ log_d])
  return huber.sum() * scale, grad


def fit_law(runs: Runs, starts: np.ndarray | None = None, delta: float = HUBER_DELTA) -> Law:
  """Approach 3: L-BFGS-B on the Huber objective from every starting point [s, 5]; keeps the best."""
  starts = init_grid() if starts is None else np.atleast_2d(starts)
  args = (np.log(runs.params), np.log(runs.tokens), np.log(runs.loss), delta)
  bounds = [(None, None)] * 3 + [(0.0, None)] * 2
  best = None
  for x0 in starts:
    res = optimize.minimize(huber_objective, x0, args=args, jac=True, method="L-BFGS-B", bounds=bounds,
                            options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-9})
    if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
      best = res
  if best is None:
    raise ValueError("no starting point reached a finite objective")
  return Law.from_theta(best.x)


# ---------------------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP profiles.


@dataclasses.dataclass(frozen=True)
class Isoflop:
  """Per budget [k], loss = p0 x^2 + p1 x + p2 in x = ln N, and ln N_opt = a_n ln C + c_n through the minima.

  D_opt = C / (6 N_opt), so its exponent a_d = 1 - a_n: the two are fitted separately only for the record.
  """

  budgets: np.ndarray  # [k] C
  parabolas: np.ndarray  # [k, 3] (p0, p1, p2)
  n_min: np.ndarray  # [k] N at each parabola's minimum
  loss_min: np.ndarray  # [k] loss there
  a_n: float
  c_n: float
  a_d: float
  c_d: float
  skipped: tuple[float, ...] = ()  # budgets with under 3 sizes or a profile that is not convex

  @property
  def d_min(self) -> np.ndarray:
    return self.budgets / (6.0 * self.n_min)

  def n_opt(self, c):
    return np.exp(self.a_n * np.log(c) + self.c_n)

  def d_opt(self, c):
    return np.exp(self.a_d * np.log(c) + self.c_d)

  def summary(self) -> dict[str, float]:
    return {"a_N": self.a_n, "a_D": self.a_d}


def fit_isoflop(runs: Runs) -> Isoflop:
  """Approach 2 on the runs that carry a `flop_budget`; raises ValueError with under two usable budgets."""
  rows, skipped = [], []
  for c in np.unique(runs.budget[np.isfinite(runs.budget)]):
    on = runs.budget == c
    x, y = np.log(runs.params[on]), runs.loss[on]
    p = np.polyfit(x, y, 2) if len(np.unique(x)) >= 3 else None
    if p is None or p[0] <= 0:
      skipped.append(float(c))
      continue
    x_min = -p[1] / (2 * p[0])
    rows.append((c, p, math.exp(x_min), np.polyval(p, x_min)))
  if len(rows) < 2:
    raise ValueError(f"approach 2 needs 2 budgets with a convex profile of 3+ sizes; got {len(rows)}")
  budgets, parabolas, n_min, loss_min = (np.array(col, dtype=np.float64) for col in zip(*rows))
  a_n, c_n = np.polyfit(np.log(budgets), np.log(n_min), 1)
  a_d, c_d = np.polyfit(np.log(budgets), np.log(budgets / (6 * n_min)), 1)
  return Isoflop(budgets, parabolas, n_min, loss_min, float(a_n), float(c_n), float(a_d), float(c_d),
                 tuple(skipped))


# ---------------------------------------------------------------------------------------------------------
# Bootstrap and the per-family fit.


def bootstrap(runs: Runs, statistic: Callable[[Runs], dict[str, float]], n: int = 200, level: float = 0.95,
              seed: int = 0, strata: np.ndarray | None = None) -> tuple[dict[str, tuple[float, float]], int]:
  """Percentile intervals of `statistic` over `n` resamples of the runs with replacement.

  `strata` [n_runs] resamples within each group (each IsoFLOP budget keeps its run count). Resamples on which
  `statistic` raises ValueError are dropped; returns the intervals and the number of resamples kept.
  """
  rng = np.random.default_rng(seed)
  if strata is None:
    groups = [np.arange(len(runs))]
  else:
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
  samples = []
  for _ in range(n):
    idx = np.concatenate([rng.choice(g, size=len(g)) for g in groups])
    try:
      samples.append(statistic(runs.take(idx)))
    except ValueError:
      continue
  if not samples:
    raise ValueError("every bootstrap resample failed")
  tail = 50.0 * (1.0 - level)
  ci = {}
  for key in samples[0]:
    lo, hi = np.percentile([s[key] for s in samples], [tail, 100.0 - tail])
    ci[key] = (float(lo), float(hi))
  return ci, len(samples)


@dataclasses.dataclass(frozen=True)
class FamilyFit:
  """Approach 3 (and approach 2 where the runs hold IsoFLOP budgets) for one family, with bootstrap CIs."""

  runs: Runs
  law: Law
  law_ci: dict[str, tuple[float, float]]
  isoflop: Isoflop | None
  isoflop_ci: dict[str, tuple[float, float]] | None
  settings: dict[str, Any]  # grid, Huber delta, bootstrap n, level, seed, resamples kept per approach

  def to_json(self) -> dict[str, Any]:
    out = {"runs": len(self.runs), "settings": self.settings,
           "approach3": {"params": self.law.summary(), "ci": self.law_ci}, "approach2": None}
    if self.isoflop is not None:
      iso = self.isoflop
      budgets = [{"flops": float(c), "n_opt": float(n), "d_opt": float(d), "loss": float(l)}
                 for c, n, d, l in zip(iso.budgets, iso.n_min, iso.d_min, iso.loss_min)]
      out["approach2"] = {"params": iso.summary(), "ci": self.isoflop_ci, "budgets": budgets,
                          "skipped_budgets": list(iso.skipped)}
    return out


def fit_family(runs: Runs, grid: str = "full", n_boot: int = 200, level: float = 0.95, seed: int = 0,
               delta: float = HUBER_DELTA) -> FamilyFit:
  """Fits both approaches with bootstrap CIs; `grid` is "full" (Chinchilla's) or "coarse".

  Bootstrap refits of approach 3 start from the full-data estimate, not the grid: a resample moves the
  optimum only slightly, and a grid per resample would cost the grid's size times more.
  """
  law = fit_law(runs, init_grid(coarse=grid == "coarse"), delta)
  law_ci, kept3 = bootstrap(runs, lambda r: fit_law(r, law.theta, delta).summary(), n_boot, level, seed)
  info = {"grid": grid, "huber_delta": delta, "bootstrap": n_boot, "level": level, "seed": seed,
          "kept_approach3": kept3}
  isoflop = isoflop_ci = None
  on = np.isfinite(runs.budget)
  if on.any():
    try:
      isoflop = fit_isoflop(runs)
    except ValueError as e:
      logging.getLogger(__name__).warning("approach 2 skipped: %s", e)
  if isoflop is not None:
    iso_runs = runs.take(np.flatnonzero(on))
    stat = lambda r: fit_isoflop(r).summary()
    isoflop_ci, info["kept_approach2"] = bootstrap(iso_runs, stat, n_boot, level, seed, iso_runs.budget)
  return FamilyFit(runs, law, law_ci, isoflop, isoflop_ci, info)


# ---------------------------------------------------------------------------------------------------------
# Command line.


def _fmt(value: float, ci: tuple[float, float] | None) -> str:
  return f"{value:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")


def summary(name: str, fit: FamilyFit) -> str:
  """A few readable lines: parameters and frontier exponents with their CIs."""
  s, ci = fit.law.summary(), fit.law_ci
  level = f"{100 * fit.settings['level']:g}% CI"
  lines = [f"{name}: {len(fit.runs)} runs ({level})",
           "  approach 3: " + "  ".join(f"{k}={_fmt(s[k], ci.get(k))}" for k in LAW_NAMES),
           f"    N*(C) ~ C^{_fmt(s['a'], ci.get('a'))}   D*(C) ~ C^{_fmt(s['b'], ci.get('b'))}"]
  if fit.isoflop is not None:
    iso, ci2 = fit.isoflop, fit.isoflop_ci
    lines.append(f"  approach 2: N_opt ~ C^{_fmt(iso.a_n, ci2['a_N'])}   "
                 f"D_opt ~ C^{_fmt(iso.a_d, ci2['a_D'])}   ({len(iso.budgets)} budgets)")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--results", required=True, help="sweep results, JSONL or CSV (local or a bucket URL)")
  parser.add_argument("--out", required=True, help="directory for fit.json and the PNGs (local or a bucket URL)")
  parser.add_argument("--grid", choices=("full", "coarse"), default="full",
                      help="approach-3 starting points: Chinchilla's 4,500 or a coarse 243")
  parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples")
  parser.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
  parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  args = parser.parse_args(argv)

  fits = {name: fit_family(runs, args.grid, args.bootstrap, args.level, args.seed)
          for name, runs in load_results(args.results).items()}
  out = storage.as_path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  storage.write_atomic(out / "fit.json", json.dumps({k: f.to_json() for k, f in fits.items()}, indent=2) + "\n")
  figures = [plot.plot_loss_vs_flops(fits, out / "loss_vs_flops.png"),
             plot.plot_isoflop(fits, out / "isoflop.png"),
             plot.plot_frontier(fits, out / "frontier.png")]
  for name, fit in fits.items():
    print(summary(name, fit))
  print(f"wrote {out / 'fit.json'}, " + ", ".join(str(p) for p in figures if p is not None))


if __name__ == "__main__":
  main()
