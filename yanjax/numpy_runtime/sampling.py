"""Next-token choice in NumPy, with the same filters and order as yanjax.inference.sampling:

    logits / temperature -> top_k (exactly top_k tokens, lower ids win ties) -> top_p (keep tokens while the
    probability before them is < top_p) -> one categorical draw.

Temperature 0 is greedy (argmax, lowest id on ties), which matches the JAX model token for token; random
draws use NumPy's generator and so differ from JAX's streams.
"""

from __future__ import annotations

import numpy as np


def filtered_logits(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
  """logits [..., V] -> float64 logits after temperature, top-k and top-p (dropped tokens at -inf)."""
  x = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-x, axis=-1, kind="stable")  # descending, lower id first on ties
  keep_sorted = np.ones(order.shape, bool)
  if 0 < top_k < x.shape[-1]:
    keep_sorted[..., top_k:] = False
  if top_p < 1.0:
    s = np.where(keep_sorted, np.take_along_axis(x, order, axis=-1), -np.inf)
    probs = np.exp(s - s[..., :1])
    probs /= probs.sum(axis=-1, keepdims=True)
    before = np.cumsum(probs, axis=-1) - probs
    keep_sorted &= before < top_p
  keep = np.zeros(order.shape, bool)
  np.put_along_axis(keep, order, keep_sorted, axis=-1)
  return np.where(keep, x, -np.inf)


def sample(logits: np.ndarray, rng: np.random.Generator | None, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> np.ndarray:
  """Next tokens: logits [b, V] -> int64 [b]. `rng` is unused (may be None) when temperature is 0."""
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
  logits = np.asarray(logits)
  if temperature == 0:
    return np.argmax(logits, axis=-1)
  x = filtered_logits(logits, temperature, top_k, top_p)
  probs = np.exp(x - x.max(axis=-1, keepdims=True))
  probs /= probs.sum(axis=-1, keepdims=True)
  u = rng.random(probs.shape[:-1])[..., None]
  return np.minimum(np.sum(np.cumsum(probs, axis=-1) < u, axis=-1), logits.shape[-1] - 1)
