"""Scaling-law fits to a sweep's results: Chinchilla approaches 2 and 3, with bootstrap intervals.

Approach 3 fits L(N, D) = E + A / N^alpha + B / D^beta to every run; approach 2 fits a parabola in log N to
each IsoFLOP profile and a power law through the parabolas' minima (Hoffmann et al. 2022). docs/scaling.md
gives the formulas, the fitting details and how to read the figures.

  python -m yanjax.main.fit --results results.jsonl --out fits/

Both paths may be local or gs:// / s3:// URLs. Results that cannot support a fit are refused (`FitError`)
before anything is written: a family with fewer distinct (N, D) points than approach 3 has parameters (5).
Approach 2 needs 2 FLOP budgets with 3+ sizes each; where it cannot be fitted but approach 3 can, approach 3
is reported alone and the output says why approach 2 is missing. Outputs are written only once every fit
succeeded, each file whole or not at all.
Shapes: the legend in docs/model.md, and here `n` = runs, `m` = starting points, `q` = FLOP budgets.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

# Set before numpy loads OpenBLAS, unless the caller chose: L-BFGS-B makes thousands of tiny BLAS calls a
# fit, and waking OpenBLAS's threads for each costs more than the call (9x slower on 2 busy shared cores).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from etils import epath
from scipy import optimize

from yanjax.core import storage
from yanjax.scaling import plot
from yanjax.scaling.laws import FamilyFit, FitError, Isoflop, Law, Runs

LAW_NAMES = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3
# Lower bound of E (nats): a sweep that cannot separate an irreducible loss drives ln E towards -inf, where
# exp(ln E) underflows to 0 and the fit cannot be restarted from it; it is reported at this bound instead.
E_FLOOR = 1e-3
MIN_SIZES_PER_BUDGET = 3  # a parabola through each IsoFLOP profile
MIN_BUDGETS = 2  # a power law through the parabolas' minima
FIGURES = ("loss_vs_flops.png", "isoflop.png", "frontier.png")


# ---------------------------------------------------------------------------------------------------------
# Results records.


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
      raise FitError(f"record {i} has no family: {record}")
    families.setdefault(str(record["family"]), []).append(record)
  return {name: Runs.from_records(rs) for name, rs in families.items()}


def load_results(path: str | os.PathLike) -> dict[str, Runs]:
  """Reads a sweep's JSONL or CSV results file into runs per family."""
  return group_by_family(read_records(path))


# ---------------------------------------------------------------------------------------------------------
# Approach 3: the parametric law.


def init_grid(coarse: bool = False) -> np.ndarray:
  """Starting points [m, 5] as (a, b, e, alpha, beta), a = log A, b = log B, e = log E.

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


def distinct_points(runs: Runs) -> int:
  """The number of distinct (N, D) pairs among the runs: repeats add no information about the law."""
  return len(set(zip(runs.params.tolist(), runs.tokens.tolist())))


def check_approach3(runs: Runs) -> None:
  """Raises FitError when the runs hold fewer distinct (N, D) points than the law has parameters."""
  count = distinct_points(runs)
  if count < len(LAW_NAMES):
    raise FitError(f"approach 3 fits {len(LAW_NAMES)} parameters ({', '.join(LAW_NAMES)}) and needs at least "
                   f"{len(LAW_NAMES)} distinct (N, D) points; got {count}")


def fit_law(runs: Runs, starts: np.ndarray | None = None, delta: float = HUBER_DELTA) -> Law:
  """Approach 3: L-BFGS-B on the Huber objective from every starting point [m, 5]; keeps the best."""
  starts = init_grid() if starts is None else np.atleast_2d(starts)
  args = (np.log(runs.params), np.log(runs.tokens), np.log(runs.loss), delta)
  bounds = [(None, None)] * 2 + [(math.log(E_FLOOR), None)] + [(0.0, None)] * 2
  best = None
  for x0 in starts:
    res = optimize.minimize(huber_objective, x0, args=args, jac=True, method="L-BFGS-B", bounds=bounds,
                            options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-9})
    if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
      best = res
  if best is None:
    raise ValueError("no starting point reached a finite objective")
  try:
    return Law.from_theta(best.x)
  except OverflowError as e:  # A / N^alpha or B / D^beta ran off to infinity against its exponent
    raise ValueError(f"the fit diverged (ln A, ln B = {best.x[0]:.3g}, {best.x[1]:.3g})") from e


# ---------------------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP profiles.


def fit_isoflop(runs: Runs) -> Isoflop:
  """Approach 2 on the runs that carry a `flop_budget`; raises ValueError (naming each budget's number of
  sizes) with fewer than MIN_BUDGETS budgets of MIN_SIZES_PER_BUDGET+ sizes and a convex profile whose minimum
  lies within the sizes trained."""
  rows, skipped, reasons = [], [], []
  for c in np.unique(runs.budget[np.isfinite(runs.budget)]):
    on = runs.budget == c
    x, y = np.log(runs.params[on]), runs.loss[on]
    sizes = len(np.unique(x))
    p = np.polyfit(x, y, 2) if sizes >= MIN_SIZES_PER_BUDGET else None
    if p is None or p[0] <= 0:
      skipped.append(float(c))
      reasons.append(f"C={c:.3g}: {sizes} size{'s' * (sizes != 1)}" + ("" if p is None else ", not convex"))
      continue
    x_min = -p[1] / (2 * p[0])
    if not x.min() <= x_min <= x.max():  # the optimum lies beyond the sizes trained: an extrapolation
      skipped.append(float(c))
      reasons.append(f"C={c:.3g}: minimum at N={math.exp(x_min):.3g}, outside the sizes "
                     f"{math.exp(x.min()):.3g}-{math.exp(x.max()):.3g}")
      continue
    rows.append((c, p, math.exp(x_min), np.polyval(p, x_min)))
  if len(rows) < MIN_BUDGETS:
    raise ValueError(f"approach 2 needs at least {MIN_BUDGETS} FLOP budgets with {MIN_SIZES_PER_BUDGET}+ sizes "
                     f"each and a convex profile whose minimum lies within them; got {len(rows)}"
                     + (f" ({'; '.join(reasons)})" if reasons else ""))
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
  if len(samples) < 2:  # one sample would give intervals of zero width
    raise ValueError(f"{len(samples)} of {n} bootstrap resamples could be fitted; intervals need 2 or more")
  tail = 50.0 * (1.0 - level)
  ci = {}
  for key in samples[0]:
    lo, hi = np.percentile([s[key] for s in samples], [tail, 100.0 - tail])
    ci[key] = (float(lo), float(hi))
  return ci, len(samples)


def check_widths(ci: dict[str, tuple[float, float]], keys: Sequence[str]) -> None:
  """Raises ValueError when every interval of `keys` has zero width: every resample gave the same fit, so the
  bootstrap says nothing of its uncertainty. One parameter pinned at its bound in every resample (E, on a
  small grid that cannot separate it from A / N^alpha) leaves the others' intervals meaningful: kept."""
  flat = [k for k in keys if ci[k][1] - ci[k][0] <= 1e-9 * max(abs(ci[k][0]), abs(ci[k][1]), 1e-300)]
  if flat and len(flat) == len(keys):
    raise ValueError(f"every bootstrap resample gives the same {', '.join(flat)} (intervals of zero width): the "
                     "points do not show the fit's uncertainty; add points with other sizes and token counts")


def fit_family(runs: Runs, grid: str = "full", n_boot: int = 200, level: float = 0.95, seed: int = 0,
               delta: float = HUBER_DELTA) -> FamilyFit:
  """Fits both approaches with bootstrap CIs; `grid` is "full" (Chinchilla's) or "coarse".

  Raises FitError when approach 3 cannot be fitted (`check_approach3`, fewer than 2 bootstrap resamples
  fitted, or an interval of zero width: `check_widths`). Approach 2, where the runs hold FLOP budgets but
  cannot support it, is left out with the reason in `isoflop_refused` (and a warning). Bootstrap refits of
  approach 3 start from the full-data estimate, not the grid: a resample moves the optimum only slightly,
  and a grid per resample would cost the grid's size times more.
  """
  check_approach3(runs)
  try:
    law = fit_law(runs, init_grid(coarse=grid == "coarse"), delta)
    law_ci, kept3 = bootstrap(runs, lambda r: fit_law(r, law.theta, delta).summary(), n_boot, level, seed)
    check_widths(law_ci, LAW_NAMES)
  except ValueError as e:
    raise FitError(f"approach 3: {e}") from e
  info = {"grid": grid, "huber_delta": delta, "bootstrap": n_boot, "level": level, "seed": seed,
          "kept_approach3": kept3}
  isoflop = isoflop_ci = refused = None
  on = np.isfinite(runs.budget)
  if on.any():
    try:
      isoflop = fit_isoflop(runs)
      iso_runs = runs.take(np.flatnonzero(on))
      isoflop_ci, info["kept_approach2"] = bootstrap(iso_runs, lambda r: fit_isoflop(r).summary(),
                                                     n_boot, level, seed, iso_runs.budget)
      check_widths(isoflop_ci, ("a_N",))
    except ValueError as e:
      isoflop = isoflop_ci = None
      refused = str(e)
      logging.getLogger(__name__).warning("approach 2 not fitted: %s", e)
  return FamilyFit(runs, law, law_ci, isoflop, isoflop_ci, info, refused)


def fit_families(families: dict[str, Runs], grid: str = "full", n_boot: int = 200, level: float = 0.95,
                 seed: int = 0) -> dict[str, FamilyFit]:
  """`fit_family` for each family; FitError naming every family that cannot be fitted, raised before any
  fitting when the counts rule it out."""
  if not families:
    raise FitError("no results to fit")
  if n_boot < 2:
    raise FitError(f"bootstrap={n_boot}: intervals need at least 2 resamples")
  refused = []
  for name, runs in families.items():
    try:
      check_approach3(runs)
    except FitError as e:
      refused.append(f"family {name!r}: {e}")
  if refused:
    raise FitError("; ".join(refused))
  fits = {}
  for name, runs in families.items():
    try:
      fits[name] = fit_family(runs, grid, n_boot, level, seed)
    except FitError as e:
      raise FitError(f"family {name!r}: {e}") from e
  return fits


def write_fits(fits: dict[str, FamilyFit], out: str | os.PathLike) -> list[epath.Path]:
  """Writes fit.json and the figures to `out`, each file whole; returns the paths written.

  The figures are drawn (to a local scratch directory) before anything is written to `out`, so a figure
  that fails leaves an earlier fit's files as they were.
  """
  out = storage.as_path(out)
  files = {}
  with tempfile.TemporaryDirectory() as scratch:
    drawn = [plot.plot_loss_vs_flops(fits, os.path.join(scratch, FIGURES[0])),
             plot.plot_isoflop(fits, os.path.join(scratch, FIGURES[1])),
             plot.plot_frontier(fits, os.path.join(scratch, FIGURES[2]))]
    for path in drawn:
      if path is not None:
        files[path.name] = path.read_bytes()
  files["fit.json"] = (json.dumps({k: f.to_json() for k, f in fits.items()}, indent=2) + "\n").encode()
  if not storage.is_remote(out):  # object stores have no directories (and s3fs's mkdir creates buckets)
    out.mkdir(parents=True, exist_ok=True)
  for name, data in files.items():  # fit.json last
    storage.write_atomic(out / name, data)
  return [out / name for name in files]


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
    skipped = f", skipped {', '.join(f'C={c:.3g}' for c in iso.skipped)}" if iso.skipped else ""
    lines.append(f"  approach 2: N_opt ~ C^{_fmt(iso.a_n, ci2['a_N'])}   "
                 f"D_opt ~ C^{_fmt(iso.a_d, ci2['a_D'])}   ({len(iso.budgets)} budgets{skipped})")
  if fit.isoflop_refused is not None:
    lines.append(f"  approach 2: not fitted: {fit.isoflop_refused}")
  return "\n".join(lines)


def report(fits: dict[str, FamilyFit], written: Sequence[epath.Path]) -> None:
  """Prints each family's summary and the files written."""
  for name, fit in fits.items():
    print(summary(name, fit))
  print("wrote " + ", ".join(str(p) for p in written))
