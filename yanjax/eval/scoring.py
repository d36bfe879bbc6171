"""Log-likelihoods of token sequences under a model, batched; long sequences are read once, window by window.

A batch of b sequences is right-padded and fed in windows of `window` tokens, each window prefilled into the
cache the previous one left: an MCSD model carries its O(1) state from window to window, so a sequence of any
length is read once (no prefix is ever re-run) in memory bounded by the window; an attention model carries its
KV cache, which holds model.max_decode_len tokens at most (a longer sequence is refused). The model is causal,
so the padding after a row's end never changes that row's scores.

    scores = score(JaxBackend(model), [[1, 17, 42, 9], [1, 5]], starts=[2, 1])   # log p(42, 9 | 1, 17), log p(5 | 1)

The model is a `yanjax.model.lm.LanguageModel` (`JaxBackend`) or a `yanjax.numpy_runtime.Model` of an export
(`NumpyBackend`); a `Backend` is the two calls evaluation makes: score one window, and generate.

Shapes: b = rows of a batch, w = one window's tokens.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import numpy as np

from yanjax.core.errors import UserError
from yanjax.numpy_runtime.mixers import max_context


class Score(NamedTuple):
  """The log-likelihood of one sequence's scored tokens."""
  logprob: float  # sum over the scored tokens of log p(token | every token before it), natural log
  greedy: bool  # whether every scored token is the argmax of the logits that predict it


class Backend:
  """A model behind the two calls evaluation makes: score one window of a batch, and generate."""

  vocab_size: int
  max_context: int | None  # the most tokens one cache holds (attention: max_decode_len); None: unbounded
  pattern: tuple[str, ...]  # the layers' mixers, repeated (model.pattern)

  def init_cache(self, batch: int):
    raise NotImplementedError

  def window(self, cache, inputs: np.ndarray, targets: np.ndarray):
    """(cache, inputs [b, w], targets [b, w]) -> (log p(targets) [b, w], argmax == targets [b, w], the cache
    after the inputs)."""
    raise NotImplementedError

  def generate(self, prompts: list[list[int]], *, max_new_tokens: int, sampling, eos_id: int | None,
               seed: int, row_seeds: list[int], vocab_limit: int | None) -> list[list[int]]:
    """The generated ids of each prompt (eos not included); `sampling` a yanjax.inference.sampling.Sampling."""
    raise NotImplementedError


class JaxBackend(Backend):
  """A `LanguageModel`: one jitted prefill-and-score per window shape; generation by
  yanjax.inference.generate (O(1) state or KV cache, one jitted loop)."""

  def __init__(self, model):
    from flax import nnx  # pylint: disable=import-outside-toplevel  # the NumPy backend needs no JAX
    self.model = model
    self.vocab_size, self.max_context, self.pattern = model.cfg.vocab_size, model.cfg.max_context, model.cfg.pattern
    self.graphdef, self.state = nnx.split(model)
    self._empty = {}  # batch -> an empty cache (immutable arrays: every batch starts from the same one)

  def init_cache(self, batch):
    if batch not in self._empty:
      self._empty[batch] = self.model.init_cache(batch)
    return self._empty[batch]

  def window(self, cache, inputs, targets):
    logprob, greedy, cache = _jitted_window()(self.graphdef, self.state, cache, inputs, targets)
    return _on_host(logprob), _on_host(greedy), cache

  def generate(self, prompts, *, max_new_tokens, sampling, eos_id, seed, row_seeds, vocab_limit):
    from yanjax.inference.generate import generate  # pylint: disable=import-outside-toplevel
    return [c.tokens for c in generate(self.model, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                                       eos_id=eos_id, seed=seed, row_seeds=row_seeds, vocab_limit=vocab_limit)]


def _on_host(array) -> np.ndarray:
  """The whole of `array` on this host: on parameters sharded over several processes (the trainer's in-loop
  evaluation) an output may be split between them, and every process gets all of it."""
  if array.is_fully_addressable:
    return np.asarray(array)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


@functools.cache
def _jitted_window():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  @functools.partial(jax.jit, static_argnames=("graphdef",))
  def run(graphdef, state, cache, inputs, targets):
    logits, cache = nnx.merge(graphdef, state, copy=True).prefill(inputs, cache)
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets, cache

  return run


class NumpyBackend(Backend):
  """A `yanjax.numpy_runtime.Model` (an export), in NumPy alone."""

  def __init__(self, model):
    self.model = model
    self.vocab_size, self.pattern = model.cfg["vocab_size"], model.cfg["pattern"]
    self.max_context = max_context(model.cfg)

  def init_cache(self, batch):
    return self.model.init_state(batch, self.max_context)

  def window(self, cache, inputs, targets):
    logits, cache = self.model.prefill(inputs, cache)
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1)
    logsumexp = top + np.log(np.exp(logits - top[..., None]).sum(axis=-1))
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - logsumexp, logits.argmax(axis=-1) == targets, cache

  def generate(self, prompts, *, max_new_tokens, sampling, eos_id, seed, row_seeds, vocab_limit):
    from yanjax.numpy_runtime.generate import generate  # pylint: disable=import-outside-toplevel
    del row_seeds  # the NumPy runtime draws from one generator per batch
    return [c.tokens for c in generate(self.model, prompts, max_new_tokens=max_new_tokens,
                                       temperature=sampling.temperature, top_k=sampling.top_k,
                                       top_p=sampling.top_p, eos_id=eos_id, seed=seed, vocab_limit=vocab_limit)]


MIN_WIDTH = 16  # the narrowest window compiled


def window_widths(total: int, window: int, cap: int | None = None) -> list[int]:
  """The widths of the windows that feed `total` positions, from few shapes (few compiles): up to one window,
  `total` rounded up to a power of two (at least MIN_WIDTH); beyond, whole windows, the last one padded. At most
  `cap` in all."""
  if total <= window:
    return [min(max(1 << (total - 1).bit_length(), MIN_WIDTH), window, window if cap is None else cap)]
  widths = [window] * -(-total // window)
  if cap is not None:
    widths[-1] = min(window, cap - window * (len(widths) - 1))
  return widths


def check_fits(backend: Backend, slots: int, what: str) -> None:
  """Refuses input that needs more than an attention model's KV-cache `slots` (one line, what to do)."""
  if backend.max_context is not None and slots > backend.max_context:
    raise UserError(f"{what} needs {slots} KV-cache slots but this model (pattern {backend.pattern}) has "
                    f"model.max_decode_len={backend.max_context}: use fewer few-shot examples (--num_fewshot) or "
                    "evaluate a run trained with a larger --config.model.max_decode_len")


def score(backend: Backend, sequences: Sequence[Sequence[int]], starts: Sequence[int], *, batch_size: int = 8,
          window: int = 1024) -> list[Score]:
  """The log-likelihood of tokens sequences[i][starts[i]:] given the tokens before them, for every i.

  Args:
    backend: the model (`JaxBackend` or `NumpyBackend`).
    sequences: token ids, each at least one token (the first is never scored: nothing predicts it).
    starts: 1 <= starts[i] <= len(sequences[i]); starts[i] == len(sequences[i]) scores nothing (0.0, True).
    batch_size: rows per batch; the longest sequences go first, so rows of a batch have similar lengths.
    window: tokens per prefill; a longer batch goes through the cache in windows.
  Returns:
    A `Score` per sequence, in order.
  """
  if batch_size < 1 or window < 1:
    raise UserError(f"batch_size={batch_size}, window={window}: both must be >= 1")
  sequences = [list(map(int, s)) for s in sequences]
  for i, (seq, start) in enumerate(zip(sequences, starts)):
    if not 1 <= start <= len(seq):
      raise ValueError(f"sequence {i}: start {start} outside [1, {len(seq)}]")
    bad = [t for t in seq if not 0 <= t < backend.vocab_size]
    if bad:
      raise UserError(f"sequence {i} has token ids {bad[:5]} outside the model's vocabulary [0, {backend.vocab_size})")
    check_fits(backend, len(seq) - 1, f"request {i} (bos, context and continuation but the last token)")
  results: list[Score | None] = [None] * len(sequences)
  order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
  for first in range(0, len(order), batch_size):
    rows = order[first:first + batch_size]
    total = len(sequences[rows[0]]) - 1
    if total == 0:  # single tokens: nothing to predict
      for i in rows:
        results[i] = Score(0.0, True)
      continue
    widths = window_widths(total, window, backend.max_context)
    inputs = np.zeros((batch_size, sum(widths)), np.int32)
    targets = np.zeros_like(inputs)
    for r, i in enumerate(rows):
      seq = sequences[i]
      inputs[r, :len(seq) - 1] = seq[:-1]
      targets[r, :len(seq) - 1] = seq[1:]
    cache, parts, column = backend.init_cache(batch_size), [], 0
    for width in widths:
      logprob, greedy, cache = backend.window(cache, inputs[:, column:column + width],
                                             targets[:, column:column + width])
      parts.append((logprob, greedy))
      column += width
    logprob = np.concatenate([np.asarray(p, np.float64) for p, _ in parts], axis=1)
    greedy = np.concatenate([np.asarray(g) for _, g in parts], axis=1)
    for r, i in enumerate(rows):
      scored = slice(starts[i] - 1, len(sequences[i]) - 1)  # targets[j] is token j + 1
      results[i] = Score(float(logprob[r, scored].sum()), bool(greedy[r, scored].all()))
  return results
