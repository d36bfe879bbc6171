"""Figures of scaling-law fits: loss against FLOPs, IsoFLOP profiles and the compute-optimal frontier.

Each function draws every family in `fits` (name -> `FamilyFit`, see laws.py) on one figure, with its own
colour map and marker, and writes a PNG through matplotlib's Agg canvas (no pyplot, no global backend) to a
local path or a gs:// / s3:// URL. docs/scaling.md says how to read them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib import colors as mcolors
from matplotlib import ticker
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from yanjax.core import storage

if TYPE_CHECKING:
  from etils import epath

  from yanjax.scaling.laws import FamilyFit

_STYLES = (("Blues", "o"), ("Oranges", "s"), ("Greens", "^"), ("Purples", "D"), ("Reds", "v"))


def family_style(i: int) -> tuple[mcolors.Colormap, str]:
  """Family i's colour map (its light end cut off, so every shade shows on white) and marker."""
  name, marker = _STYLES[i % len(_STYLES)]
  cmap = mcolors.ListedColormap(matplotlib.colormaps[name](np.linspace(0.4, 0.95, 256)))
  return cmap, marker


def _shader(cmap: mcolors.Colormap, values: np.ndarray, ax, label: str):
  """A value -> colour map on a log scale, with its colour bar beside `ax`."""
  norm = mcolors.LogNorm(values.min(), values.max() * (1 + 1e-9))
  ax.figure.colorbar(ScalarMappable(norm, cmap), ax=ax, label=label, pad=0.01, aspect=40)
  return lambda v: cmap(norm(v))


def save_png(fig: Figure, path: str | os.PathLike) -> epath.Path:
  """Writes `fig` as a PNG whole or not at all (one upload to a bucket, a renamed file locally)."""
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=130, bbox_inches="tight")
  path = storage.as_path(path)
  storage.write_atomic(path, png.getvalue())
  return path


def plot_loss_vs_flops(fits: Mapping[str, FamilyFit], path: str | os.PathLike) -> epath.Path:
  """Loss against FLOPs: runs (points) and the approach-3 law (a line per model size), plus L*(C) dashed.

  A size's line follows L(N, D) over its runs' token range widened 3x each way, placed at that size's FLOPs
  per token, so an IsoFLOP-only sweep (one run a size) shows short segments of the surface.
  """
  fig = Figure(figsize=(9, 5.5), layout="constrained")
  ax = fig.add_subplot()
  handles = []
  for i, (name, fit) in enumerate(fits.items()):
    cmap, marker = family_style(i)
    runs = fit.runs
    shade = _shader(cmap, runs.params, ax, f"{name}: parameters N")
    for n in np.unique(runs.params):
      on = runs.params == n
      d_grid = np.geomspace(runs.tokens[on].min() / 3, runs.tokens[on].max() * 3, 50)
      per_token = np.median(runs.flops[on] / runs.tokens[on])
      ax.plot(runs.flops[on], runs.loss[on], marker, color=shade(n), ms=4, alpha=0.85)
      ax.plot(per_token * d_grid, fit.law.loss(n, d_grid), color=shade(n), lw=0.8, alpha=0.7)
    c_grid = np.geomspace(runs.flops.min(), runs.flops.max(), 100)
    ax.plot(c_grid, fit.law.loss_opt(c_grid), "--", color=cmap(1.0), lw=2.2)
    handles += [Line2D([], [], marker=marker, color=cmap(0.6), lw=0.8,
                       label=f"{name}: runs, L(N, D) per size"),
                Line2D([], [], ls="--", color=cmap(1.0), lw=2.2, label=f"{name}: frontier L*(C)")]
  ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="validation loss",
         title="Loss against compute, with the approach-3 fit")
  ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
  ax.yaxis.set_minor_formatter(ticker.ScalarFormatter())
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(handles=handles, fontsize=8)
  return save_png(fig, path)


def plot_isoflop(fits: Mapping[str, FamilyFit], path: str | os.PathLike) -> epath.Path | None:
  """Loss against N per FLOP budget with the approach-2 parabolas and their minima (stars).

  Returns None, writing nothing, when no family has IsoFLOP runs.
  """
  fits = {k: f for k, f in fits.items() if f.isoflop is not None}
  if not fits:
    return None
  fig = Figure(figsize=(9, 5.5), layout="constrained")
  ax = fig.add_subplot()
  handles = []
  for i, (name, fit) in enumerate(fits.items()):
    cmap, marker = family_style(i)
    runs, iso = fit.runs, fit.isoflop
    on_any = np.isfinite(runs.budget)
    shade = _shader(cmap, runs.budget[on_any], ax, f"{name}: FLOP budget C")
    for c in np.unique(runs.budget[on_any]):
      on = runs.budget == c
      ax.plot(runs.params[on], runs.loss[on], marker, color=shade(c), ms=4, ls="none")
    for c, p, n_min, l_min in zip(iso.budgets, iso.parabolas, iso.n_min, iso.loss_min):
      on = runs.budget == c
      x = np.linspace(np.log(runs.params[on].min()), np.log(runs.params[on].max()), 100)
      ax.plot(np.exp(x), np.polyval(p, x), color=shade(c), lw=1)
      ax.plot(n_min, l_min, "*", color=shade(c), ms=13, mec="black", mew=0.8)
    handles += [Line2D([], [], marker=marker, color=cmap(0.6), lw=1,
                       label=f"{name}: runs, parabola per budget"),
                Line2D([], [], marker="*", ls="none", color=cmap(0.6), mec="black", ms=12,
                       label=f"{name}: minima, N_opt ~ C^{iso.a_n:.3f}")]
  ax.set(xscale="log", xlabel="parameters N", ylabel="validation loss",
         title="IsoFLOP profiles with approach-2 parabolas (loss against ln N)")
  ax.grid(True, alpha=0.3)
  ax.legend(handles=handles, fontsize=8)
  return save_png(fig, path)


def _exp(value: float, ci: tuple[float, float] | None) -> str:
  return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def plot_frontier(fits: Mapping[str, FamilyFit], path: str | os.PathLike) -> epath.Path:
  """N*(C) and D*(C) against C: approach 3 (solid), approach-2 minima (points) and their power law (dashed).

  Legends give each exponent with its bootstrap interval.
  """
  fig = Figure(figsize=(12, 5), layout="constrained")
  ax_n, ax_d = fig.subplots(1, 2)
  flops = np.concatenate([f.runs.flops for f in fits.values()])
  c_grid = np.geomspace(flops.min(), flops.max(), 100)
  for i, (name, fit) in enumerate(fits.items()):
    cmap, marker = family_style(i)
    color, law, iso = cmap(0.8), fit.law, fit.isoflop
    ax_n.plot(c_grid, law.n_opt(c_grid), color=color, lw=2,
              label=f"{name} approach 3: N* ~ C^{_exp(law.a, fit.law_ci.get('a'))}")
    ax_d.plot(c_grid, law.d_opt(c_grid), color=color, lw=2,
              label=f"{name} approach 3: D* ~ C^{_exp(law.b, fit.law_ci.get('b'))}")
    if iso is not None:
      ci = fit.isoflop_ci or {}
      ax_n.plot(iso.budgets, iso.n_min, marker, color=color, ls="none", label=f"{name} IsoFLOP minima")
      ax_n.plot(c_grid, iso.n_opt(c_grid), "--", color=color,
                label=f"{name} approach 2: C^{_exp(iso.a_n, ci.get('a_N'))}")
      ax_d.plot(iso.budgets, iso.d_min, marker, color=color, ls="none", label=f"{name} IsoFLOP minima")
      ax_d.plot(c_grid, iso.d_opt(c_grid), "--", color=color,
                label=f"{name} approach 2: C^{_exp(iso.a_d, ci.get('a_D'))}")
  for ax, what in ((ax_n, "parameters N*(C)"), (ax_d, "tokens D*(C)")):
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C (= 6 N D)", ylabel=f"compute-optimal {what}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("Compute-optimal frontier")
  return save_png(fig, path)
