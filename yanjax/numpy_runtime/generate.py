"""Generation with the NumPy runtime: the same loop as yanjax.inference.generate, step by step in Python.

The first m tokens of every prompt (m = the shortest prompt's length) are prefilled together; then each
step feeds every row one token: its next prompt token while its prompt lasts, else the token chosen from its
last logits. A row stops at the end-of-sequence id (not included in its tokens) or after max_new_tokens.
Greedy completions equal the JAX model's token for token.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from .model import Model
from .sampling import sample


class Completion(NamedTuple):
  tokens: list[int]  # generated ids, end-of-sequence excluded
  stop_reason: str  # "eos" or "length"


def generate(model: Model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, seed: int = 0,
             vocab_limit: int | None = None,
             on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None) -> list[Completion]:
  """Completions of b prompts (token ids, lengths >= 1) in one batch.

  on_tokens([b] tokens, [b] bool emitted) is called after every step, as in yanjax.inference.generate; ids >=
  vocab_limit (a model vocabulary padded past the tokenizer's) are never produced.
  """
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts:
    return []
  vocab = model.cfg["vocab_size"]
  for i, p in enumerate(prompts):
    if not p or any(not 0 <= t < vocab for t in p):
      raise ValueError(f"prompt {i} must be non-empty with ids in [0, {vocab})")
  b = len(prompts)
  lengths = np.array([len(p) for p in prompts])
  prefix = int(lengths.min())
  rng = np.random.default_rng(seed)
  state = model.init_state(b, max_len=int(lengths.max()) + max_new_tokens)
  logits, state = model.prefill(np.array([p[:prefix] for p in prompts]), state)
  logits = logits[:, -1]
  out = [[] for _ in range(b)]
  done = np.zeros(b, bool)
  hit_eos = np.zeros(b, bool)
  pos = prefix
  while True:
    forced = pos < lengths
    if vocab_limit is not None:
      logits = np.where(np.arange(vocab) < vocab_limit, logits, -np.inf)
    chosen = sample(logits, rng, temperature, top_k, top_p)
    emit = ~forced & ~done
    stop = emit & (chosen == eos_id) if eos_id is not None else np.zeros(b, bool)
    write = emit & ~stop
    for r in np.flatnonzero(write):
      out[r].append(int(chosen[r]))
    hit_eos |= stop
    done |= stop | np.array([len(o) >= max_new_tokens for o in out])
    if on_tokens is not None:
      on_tokens(chosen, write)
    if done.all():
      break
    nxt = np.array([prompts[r][pos] if forced[r] else chosen[r] for r in range(b)])
    logits, state = model.decode_step(state, nxt)
    pos += 1
  return [Completion(out[r], "eos" if hit_eos[r] else "length") for r in range(b)]
