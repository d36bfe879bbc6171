"""Passkey retrieval: can a trained language model repeat a number it read thousands of tokens earlier?

Each trial is one sequence of exactly `context` tokens (Mohtashami and Jaggi, 2023, "Landmark Attention"):

    bos, haystack ..., NEEDLE ("The pass key is 48213. Remember it. 48213 is the pass key."), haystack ...,
    QUERY ("What is the pass key? The pass key is "), ANSWER ("48213")

The haystack is real text: consecutive documents of a token store's validation split (the project's own
corpora, tokenized with the store's tokenizer, which must be the model's), from a seeded offset per trial. The
needle sits at `depth` (0: right after bos, 1: right before the query) of the haystack. A trial is retrieved
when every answer token is the model's argmax given all the tokens before it (greedy decoding would write the
key), scored in one pass through the model's state or KV cache (yanjax.eval.scoring). Each trial has a control,
the same sequence but for the key its needle states: how much more likely the answer is after the true needle
("needle_gain", in nats) shows recall that falls short of all five digits. An MCSD model reads
any context in windows through its O(1) state; an attention model holds model.max_decode_len tokens, and a
longer context is reported as not fitting rather than truncated.

    from yanjax.eval.passkey import passkey_accuracy
    rows = passkey_accuracy(backend, tokenizer, haystack, contexts=[256, 1024], depths=[0.0, 0.5, 1.0])
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from yanjax.core.errors import UserError
from yanjax.eval.scoring import Backend, score

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUERY = " What is the pass key? The pass key is "
KEY_DIGITS = 5


class Trial(NamedTuple):
  tokens: list[int]  # exactly `context` ids: bos, haystack, needle, haystack, query, answer
  answer_start: int  # tokens[answer_start:] are the key's ids
  key: int


def haystack_ids(store, min_tokens: int) -> np.ndarray:
  """Token ids [n >= min_tokens] of the store's validation documents, end to end, bos and eos dropped (a
  store with too little validation text is read around again)."""
  split = store.split("validation")
  count = split.num_documents
  if count < 1:
    raise UserError(f"{store.path}: its validation split holds no documents; prepare it with a "
                    "--validation_fraction above 0")
  parts, total, index = [], 0, 0
  while total < min_tokens:
    document = np.asarray(split.document(index % count))
    inner = document[(document != store.bos_id) & (document != store.eos_id)]
    parts.append(inner)
    total += len(inner)
    index += 1
    if index > count and total == 0:
      raise UserError(f"{store.path}: its validation documents hold no text")
  return np.concatenate(parts).astype(np.int32)


def make_trial(tokenizer, haystack: np.ndarray, context: int, depth: float, key: int, offset: float,
               stated_key: int | None = None) -> Trial:
  """The trial of `context` tokens asking for `key`, its needle (stating `stated_key`, default `key`) at `depth`
  of haystack[o:], o being the fraction `offset` of the haystack's spare length."""
  needle = tokenizer.encode(NEEDLE.format(key=key if stated_key is None else stated_key))
  query = tokenizer.encode(QUERY)
  answer = tokenizer.encode(str(key))
  filler = context - 1 - len(needle) - len(query) - len(answer)
  if filler < 0:
    raise UserError(f"context {context}: too short for the needle, query and answer "
                    f"({context - filler - 1} tokens); use 256 or more")
  start = int(offset * max(len(haystack) - filler, 0))
  hay = haystack[start:start + filler].tolist()
  before = int(round(depth * filler))
  tokens = [tokenizer.bos_id, *hay[:before], *needle, *hay[before:], *query, *answer]
  return Trial(tokens, len(tokens) - len(answer), key)


def trials_for(tokenizer, haystack: np.ndarray, context: int, depth: float, trials: int,
               seed: int) -> list[tuple[Trial, Trial]]:
  """`trials` pairs (trial, control) of (context, depth), a pure function of (seed, context, depth), so every
  model is asked the same questions. The control asks for the same key where the needle stated another: the
  answer's log-probability with the needle over that without it is what the needle taught the model."""
  rng = np.random.default_rng([seed, context, int(round(depth * 1000))])
  made = []
  for _ in range(trials):
    key, other = (int(k) for k in rng.choice(np.arange(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS), 2, replace=False))
    offset = float(rng.random())
    made.append((make_trial(tokenizer, haystack, context, depth, key, offset),
                 make_trial(tokenizer, haystack, context, depth, key, offset, stated_key=other)))
  return made


def passkey_accuracy(backend: Backend, tokenizer, haystack: np.ndarray, contexts: Sequence[int],
                     depths: Sequence[float], trials: int = 4, seed: int = 0, batch_size: int = 4,
                     window: int = 1024) -> list[dict]:
  """{"context", "depth", "trials", "fits", "retrieved", "accuracy", "answer_logprob" (the mean over trials
  of log p(answer | all before it), natural log), "needle_gain" (the mean of answer_logprob minus that of the
  trial's control: what stating the key added)} per (context, depth), over `trials_for`'s trials; a context
  longer than an attention model's KV cache gives "fits": False and None for the rest (nothing is truncated)."""
  if not all(0.0 <= d <= 1.0 for d in depths):
    raise UserError(f"depths {list(depths)}: each must be within [0, 1]")
  if trials < 1:
    raise UserError(f"trials={trials}: must be >= 1")
  if len(haystack) < max(contexts):
    raise ValueError(f"the haystack holds {len(haystack)} tokens; contexts up to {max(contexts)} need as many")
  rows = []
  for context in contexts:
    fits = backend.max_context is None or context - 1 <= backend.max_context
    for depth in depths:
      made = [t for pair in trials_for(tokenizer, haystack, context, depth, trials, seed) for t in pair]
      row = {"context": context, "depth": depth, "trials": trials, "fits": fits}
      if fits:
        results = score(backend, [t.tokens for t in made], [t.answer_start for t in made],
                        batch_size=batch_size, window=window)
        asked, control = results[0::2], results[1::2]
        retrieved = sum(r.greedy for r in asked)
        row.update(retrieved=retrieved, accuracy=retrieved / trials,
                   answer_logprob=float(np.mean([r.logprob for r in asked])),
                   needle_gain=float(np.mean([a.logprob - c.logprob for a, c in zip(asked, control)])))
      else:
        row.update(retrieved=None, accuracy=None, answer_logprob=None, needle_gain=None)
      rows.append(row)
  return rows
