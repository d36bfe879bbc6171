"""Evaluation of trained models: lm-eval tasks over a run or an export (harness.py, scoring.py;
docs/evaluation.md), and synthetic recall tasks (mqar.py)."""
