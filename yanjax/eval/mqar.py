"""Multi-query associative recall (MQAR): a synthetic task that measures how many key-value pairs a token
mixer's state can hold and retrieve, reimplemented after Zoology (Arora, Eyuboglu et al. 2023, arXiv 2312.04927).

A row of t tokens with n pairs (the vocabulary's lower half are keys, the upper half values):

    k1 v1 k2 v2 ... kn vn | x x k3 v3 x x x x k1 v1 x x ... k2 v2 x x
    `---- 2n: the pairs --' `----- t - 2n: every key once more, in random order, between noise tokens x -----'

The query region is cut into slots of two tokens; n of its (t - 2n) // 2 slots hold a query key followed by its
value, the slot at gap j (counted from the region's start) chosen with probability proportional to
(j + 1)^(power - 1) as Zoology's `power_a` (0.01, its default, puts most queries near the pairs; 1.0 is uniform).
Noise tokens are uniform over the whole vocabulary, as Zoology's `random_non_queries`. The loss and the accuracy
count only the positions of the query keys, where the next token is the value paired with that key earlier in
the row. Unlike Zoology, the value also follows its query in the input, so `targets` is `inputs` shifted by one
everywhere: a row is an ordinary document the trainer (and a decoder) reads as it is.

Every batch is a pure function of (seed, step, split), with the train and eval splits drawn from disjoint
random streams. Batch format: the trainer's (yanjax/training/train_step.py), one document per row.
Shapes: the legend in docs/model.md; here n = key-value pairs per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from yanjax.core.errors import UserError

SPLITS = ("train", "eval")
ZOOLOGY_POWER = 0.01  # Zoology's default query-gap exponent power_a


def check_task(vocab_size: int, seq_len: int, pairs: Sequence[int]) -> None:
  """Raises UserError unless every pair count fits a row: n >= 1, t >= 4n (the pairs, then a slot per query)
  and n distinct keys and values (n <= V // 2)."""
  if not pairs:
    raise UserError("MQAR needs at least one pair count")
  for n in pairs:
    if n < 1:
      raise UserError(f"pairs={n}: must be >= 1")
    if 4 * n > seq_len:
      raise UserError(f"pairs={n} does not fit seq_len={seq_len}: a row needs 4 x pairs tokens "
                      "(the pairs, then a two-token slot per query)")
    if n > vocab_size // 2:
      raise UserError(f"pairs={n} needs {n} distinct keys and values: vocab_size={vocab_size} has "
                      f"{vocab_size // 2} keys; raise the vocabulary to >= {2 * n}")


def _row(rng: np.random.Generator, vocab_size: int, seq_len: int, n: int, power: float):
  """One row: (tokens [t + 1], query positions [n]); tokens[q + 1] is the value of the key tokens[q]."""
  half = vocab_size // 2
  keys = rng.permutation(half)[:n]
  values = half + rng.permutation(vocab_size - half)[:n]
  tokens = rng.integers(0, vocab_size, seq_len + 1, dtype=np.int64)  # noise, overwritten below
  tokens[0:2 * n:2], tokens[1:2 * n:2] = keys, values
  slots = (seq_len - 2 * n) // 2
  # n distinct slots, slot j with weight (j + 1)^(power - 1): the Gumbel top-k trick samples without replacement
  # in proportion to the weights; key i goes to the i-th drawn slot, so the query order is random too.
  scores = (power - 1) * np.log(np.arange(1, slots + 1)) + rng.gumbel(size=slots)
  queries = 2 * n + 2 * np.argsort(-scores)[:n]
  tokens[queries], tokens[queries + 1] = keys, values
  return tokens, queries


def make_batch(seed: int, step: int, *, batch: int, seq_len: int, pairs: Sequence[int], vocab_size: int,
               split: str = "train", power: float = ZOOLOGY_POWER) -> dict[str, np.ndarray]:
  """The MQAR batch `step` of `split` for `seed`: row i holds pairs[i % len(pairs)] pairs (a mixture when
  several are given). Returns {"inputs", "targets", "segment_ids", "positions": int32 [b, t],
  "loss_mask": float32 [b, t] (1 at the query keys)}."""
  check_task(vocab_size, seq_len, pairs)
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: choose one of {SPLITS}")
  rng = np.random.default_rng([seed, step, SPLITS.index(split)])
  rows = np.zeros((batch, seq_len + 1), np.int32)
  loss_mask = np.zeros((batch, seq_len), np.float32)
  for i in range(batch):
    rows[i], queries = _row(rng, vocab_size, seq_len, pairs[i % len(pairs)], power)
    loss_mask[i, queries] = 1.0
  return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "segment_ids": np.ones((batch, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
          "loss_mask": loss_mask}


def accuracy(logits, batch: dict) -> float:
  """The fraction of query positions (loss_mask > 0) whose argmax over logits [b, t, V] is the target (the
  value paired with the query key)."""
  mask = np.asarray(batch["loss_mask"]) > 0
  if not mask.any():
    raise ValueError("the batch has no query positions (its loss_mask is all zero)")
  predicted = np.argmax(np.asarray(logits), axis=-1)
  return float(np.mean(predicted[mask] == np.asarray(batch["targets"])[mask]))
