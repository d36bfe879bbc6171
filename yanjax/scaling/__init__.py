"""Scaling laws: Chinchilla approaches 2 and 3 fitted to a sweep's results, and their figures.

See docs/scaling.md. Names load on first use, so that `python -m yanjax.scaling.fit` runs that module once.
"""

import importlib

_EXPORTS = {
    "Runs": "fit", "Law": "fit", "Isoflop": "fit", "FamilyFit": "fit", "read_records": "fit",
    "group_by_family": "fit", "load_results": "fit", "init_grid": "fit", "fit_law": "fit",
    "fit_isoflop": "fit", "bootstrap": "fit", "fit_family": "fit",
    "plot_loss_vs_flops": "plot", "plot_isoflop": "plot", "plot_frontier": "plot",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
