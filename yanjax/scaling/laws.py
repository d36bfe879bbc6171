"""Scaling laws and the runs they are fitted to, as values: a family's runs (`Runs`), the parametric law of
approach 3 (`Law`), the IsoFLOP fit of approach 2 (`Isoflop`) and a family's fit with its intervals (`FamilyFit`).
fit.py fits them and plot.py draws them; docs/scaling.md gives the formulas.
Shapes: the legend in docs/model.md, and here `n` = runs, `q` = FLOP budgets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from yanjax.core.config import ConfigError

REQUIRED_KEYS = ("family", "params", "tokens", "flops", "val_loss")


class FitError(ConfigError):
  """The results cannot support the fit asked for (too few points, sizes or budgets)."""


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
        raise FitError(f"record {i} of family {record.get('family')!r}: {', '.join(bad)} missing, "
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


@dataclasses.dataclass(frozen=True)
class Isoflop:
  """Per budget [q], loss = p0 x^2 + p1 x + p2 in x = ln N, and ln N_opt = a_n ln C + c_n through the minima.

  D_opt = C / (6 N_opt), so its exponent a_d = 1 - a_n: the two are fitted separately only for the record.
  """

  budgets: np.ndarray  # [q] C
  parabolas: np.ndarray  # [q, 3] (p0, p1, p2)
  n_min: np.ndarray  # [q] N at each parabola's minimum
  loss_min: np.ndarray  # [q] loss there
  a_n: float
  c_n: float
  a_d: float
  c_d: float
  skipped: tuple[float, ...] = ()  # budgets with under 3 sizes, a profile that is not convex, or its minimum
  # outside the sizes trained

  @property
  def d_min(self) -> np.ndarray:
    return self.budgets / (6.0 * self.n_min)

  def n_opt(self, c):
    return np.exp(self.a_n * np.log(c) + self.c_n)

  def d_opt(self, c):
    return np.exp(self.a_d * np.log(c) + self.c_d)

  def summary(self) -> dict[str, float]:
    return {"a_N": self.a_n, "a_D": self.a_d}


@dataclasses.dataclass(frozen=True)
class FamilyFit:
  """Approach 3 (and approach 2 where the runs hold IsoFLOP budgets) for one family, with bootstrap CIs."""

  runs: Runs
  law: Law
  law_ci: dict[str, tuple[float, float]]
  isoflop: Isoflop | None
  isoflop_ci: dict[str, tuple[float, float]] | None
  settings: dict[str, Any]  # grid, Huber delta, bootstrap n, level, seed, resamples kept per approach
  isoflop_refused: str | None = None  # why approach 2 was not fitted although the runs hold FLOP budgets

  def to_json(self) -> dict[str, Any]:
    out = {"runs": len(self.runs), "settings": self.settings,
           "approach3": {"params": self.law.summary(), "ci": self.law_ci}, "approach2": None}
    if self.isoflop_refused is not None:
      out["approach2_refused"] = self.isoflop_refused
    if self.isoflop is not None:
      iso = self.isoflop
      budgets = [{"flops": float(c), "n_opt": float(n), "d_opt": float(d), "loss": float(loss)}
                 for c, n, d, loss in zip(iso.budgets, iso.n_min, iso.d_min, iso.loss_min)]
      out["approach2"] = {"params": iso.summary(), "ci": self.isoflop_ci, "budgets": budgets,
                          "skipped_budgets": list(iso.skipped)}
    return out
