"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

Pure JAX and seeded by an explicit PRNG key, so a choice is a function of (logits, key, settings). The
filters run in this order, each on the output of the one before:

    logits / temperature  ->  keep the k largest (top-k)  ->  keep the smallest set of most probable tokens
    whose probability reaches p (top-p, on the distribution left by top-k)  ->  one categorical draw.

Temperature 0 is greedy: argmax, the lowest id on ties, and no key is used. The NumPy runtime
(`yanjax.numpy_runtime.sampling`) implements the same filters for other runtimes to copy.

Shapes: the legend in docs/model.md; `...` = any leading axes (b, or b and t).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to pick the next token; the defaults are greedy decoding."""

  temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
  top_k: int = 0  # 0: off; k > 0 keeps the k most probable tokens (ties broken towards lower ids)
  top_p: float = 1.0  # 1: off; 0 < p < 1 keeps the smallest most-probable set with probability >= p

  def __post_init__(self):
    if not self.temperature >= 0.0:
      raise ValueError(f"sampling temperature={self.temperature!r}: must be >= 0 (0 = greedy)")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"sampling top_k={self.top_k!r}: must be an integer >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"sampling top_p={self.top_p!r}: must be in (0, 1] (1 = off)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def _keep(logits: jax.Array, keep: jax.Array) -> jax.Array:
  return jnp.where(keep, logits, -jnp.inf)


def _scatter_rows(shape, order: jax.Array, values: jax.Array) -> jax.Array:
  """out[..., order[..., j]] = values[..., j] along the last axis (order is a permutation or a subset)."""
  flat_order = order.reshape(-1, order.shape[-1])
  flat_values = values.reshape(-1, values.shape[-1])
  rows = jnp.arange(flat_order.shape[0])[:, None]
  out = jnp.zeros((flat_order.shape[0], shape[-1]), values.dtype).at[rows, flat_order].set(flat_values)
  return out.reshape(shape)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """logits [..., V] -> the same with all but the k largest set to -inf (exactly k kept; lower ids win ties)."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  _, idx = jax.lax.top_k(logits, k)
  return _keep(logits, _scatter_rows(logits.shape, idx, jnp.ones(idx.shape, bool)))


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """logits [..., V] -> the same with tokens outside the nucleus set to -inf.

  Tokens sorted by probability (descending, lower id first on ties) are kept while the probability of the
  tokens before them is < p: the most probable token is always kept.
  """
  if p >= 1.0:
    return logits
  order = jnp.argsort(-logits, axis=-1, stable=True)
  probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  return _keep(logits, _scatter_rows(logits.shape, order, before < p))


def filtered_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """float32 logits [..., V] after temperature, top-k and top-p: the distribution a sample is drawn from."""
  logits = logits.astype(jnp.float32) / sampling.temperature
  return top_p_filter(top_k_filter(logits, sampling.top_k), sampling.top_p)


def sample(logits: jax.Array, key: jax.Array | None, sampling: Sampling) -> jax.Array:
  """Next tokens: logits [..., V] -> int32 [...]; `key` is unused (may be None) when greedy.

  One key draws every row; for per-row streams vmap this over rows with per-row keys (as generate.py does).
  """
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if key is None:
    raise ValueError("sample: a PRNG key is required when temperature > 0")
  return jax.random.categorical(key, filtered_logits(logits, sampling), axis=-1).astype(jnp.int32)
