"""Scaling laws: sweeps (sweep.py), Chinchilla approaches 2 and 3 fitted to their results (fit.py), and the
figures (plot.py). See docs/scaling.md."""
