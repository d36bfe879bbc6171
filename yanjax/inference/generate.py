"""Text generation: prompts -> completions with the model's O(1) MCSD state or the attention KV cache.

Run (a training run's work directory, local or gs:// / s3://; the latest checkpoint and the run's tokenizer
are used; the parameters are restored onto the run's mesh, or the one --mesh names, see yanjax.inference.loading):

    python -m yanjax.main.generate --workdir runs/tiny --prompt "Once upon a time" --max_new_tokens 64
    python -m yanjax.main.generate --workdir runs/tiny --prompts_file prompts.txt --temperature 0.8 --top_p 0.95
    python -m yanjax.main.generate --workdir gs://bucket/runs/big --mesh fsdp=-1 --prompt "def main("

A single prompt is streamed to stdout as it is produced; a file (one prompt per line) gives one JSON line per
prompt, in file order (add --stream to see the text appear on stderr).

How a batch runs (`generate`), in one jitted loop:
  1. `prefill` the first m tokens of every prompt in one parallel pass (m: the shortest prompt's length,
     rounded down to a power of two below 64 or a multiple of 64 above, so few shapes are compiled);
  2. a `jax.lax.while_loop` of `decode_step`s: a row whose prompt is not used up is fed its next prompt token,
     the others are fed the token sampled from their last logits; it ends when every row has stopped (end of
     sequence, or `max_new_tokens`).
Each row sees exactly its own tokens, so a batched completion equals the same prompt generated alone (up to
float rounding of prefill vs step-by-step; greedy tokens are equal in the tests). Sampling is seeded per row
and per position: row r draws the token at position n with fold_in(fold_in(PRNGKey(seed), row_seed_r), n),
so it does not depend on which other prompts share the batch. Long prompts of very different lengths waste
steps on the longer ones; the CLI groups prompts of similar length into each batch, and pads a short last
batch with copies of its first prompt, so every batch runs the same compiled loop where lengths allow.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from yanjax.core.errors import UserError
from yanjax.inference.sampling import Sampling, sample


class Completion(NamedTuple):
  """One prompt's generated tokens."""
  tokens: list[int]  # generated ids; the end-of-sequence id itself is not included
  stop_reason: str  # "eos" (the model produced eos_id) or "length" (max_new_tokens reached)


# ---- streaming: the jitted loop calls back into the host through one module-level function -------------

# The callback runs on a runtime thread, so the active listener is a module global; the lock keeps two
# concurrent `generate` calls from streaming into each other's listener.
_listener: dict[str, Callable | None] = {"callback": None}
_listener_lock = threading.Lock()


def _emit(tokens, emitted):
  """Host side of the loop's io_callback: forwards ([b] tokens, [b] bool emitted) to the active listener."""
  callback = _listener["callback"]
  if callback is not None:
    callback(np.asarray(tokens), np.asarray(emitted))


class TextStreamer:
  """Turns a stream of token ids per row into the newly decodable text of each row.

  Decodes each row's ids so far and returns what is new; text ending in an incomplete UTF-8 sequence
  (byte-fallback pieces still to come) is held back until it completes or `flush` is called.
  """

  def __init__(self, processor, rows: int):
    self.processor = processor
    self.ids = [[] for _ in range(rows)]
    self.shown = ["" for _ in range(rows)]

  def push(self, row: int, token: int) -> str:
    self.ids[row].append(int(token))
    text = self.processor.decode(self.ids[row])
    if text.endswith("\ufffd") or not text.startswith(self.shown[row]):
      return ""
    new, self.shown[row] = text[len(self.shown[row]):], text
    return new

  def flush(self, row: int) -> str:
    text = self.processor.decode(self.ids[row])
    new = text[len(self.shown[row]):] if text.startswith(self.shown[row]) else text
    self.shown[row] = text
    return new


# ---- the library entry point ------------------------------------------------------------------------

def _check_context(cfg, longest: int, max_new_tokens: int) -> None:
  """Refuses a prompt that cannot decode within the cache: the prompt and every new token but the last
  (which is never fed back) take one KV-cache slot each, and an attention model has model.max_decode_len."""
  slots = longest + max_new_tokens - 1
  if cfg.max_context is None or slots <= cfg.max_context:
    return
  room = cfg.max_context - longest + 1
  fix = (f"lower max_new_tokens to {room} or shorten the prompt" if room >= 1 else
         f"shorten the prompt to at most {cfg.max_context} tokens")
  raise UserError(f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} needs {slots} "
                  f"KV-cache slots but this model (pattern {cfg.pattern}) has "
                  f"model.max_decode_len={cfg.max_decode_len}: {fix} "
                  "(max_decode_len is set when training, by --config.model.max_decode_len)")


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: Sampling = Sampling(), eos_id: int | None = None, seed: int = 0,
             row_seeds: Sequence[int] | None = None, vocab_limit: int | None = None,
             on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None) -> list[Completion]:
  """Generates a completion for each prompt (token ids), all rows in one batch.

  Args:
    model: a `LanguageModel`.
    prompts: b prompts of token ids, each of length >= 1 (lengths may differ).
    max_new_tokens: at most this many tokens per prompt (N).
    sampling: greedy (default), temperature, top-k, top-p.
    eos_id: a row stops when it produces this id (not included in its tokens); None: only N stops a row.
    seed, row_seeds: row r samples with fold_in(PRNGKey(seed), row_seeds[r]) (default row_seeds: 0..b-1).
    vocab_limit: ids >= vocab_limit are never produced (a model vocabulary padded past the tokenizer's).
    on_tokens: called as each step's tokens are produced, with ([b] int tokens, [b] bool emitted): row r
      produced tokens[r] iff emitted[r]. Called in order from inside the jitted loop.
  Returns:
    b `Completion`s in prompt order.
  """
  cfg = model.cfg
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts:
    return []
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens={max_new_tokens}: must be >= 1")
  for i, p in enumerate(prompts):
    if not p:
      raise UserError(f"prompt {i} is empty: give at least one token (e.g. the tokenizer's bos id)")
    bad = [t for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
      raise UserError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")
  lengths = np.array([len(p) for p in prompts], np.int32)
  _check_context(cfg, int(lengths.max()), max_new_tokens)
  if vocab_limit is not None and not 0 < vocab_limit <= cfg.vocab_size:
    raise ValueError(f"vocab_limit={vocab_limit}: must be in [1, {cfg.vocab_size}]")
  if row_seeds is None:
    row_seeds = range(len(prompts))
  if len(row_seeds) != len(prompts):
    raise ValueError(f"row_seeds has {len(row_seeds)} entries for {len(prompts)} prompts")
  width = -(-int(lengths.max()) // _BUCKET) * _BUCKET  # padded so that batches share compiled loops
  tokens = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  base = jax.random.PRNGKey(seed)
  row_keys = jax.vmap(lambda s: jax.random.fold_in(base, s))(jnp.asarray(list(row_seeds), jnp.uint32))

  graphdef, state = nnx.split(model)
  with _listener_lock:
    _listener["callback"] = on_tokens
    try:
      out, count, hit_eos = _decode_loop(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), row_keys,
                                         prefix=prefill_length(int(lengths.min())), max_new_tokens=max_new_tokens,
                                         sampling=sampling, eos_id=eos_id, vocab_limit=vocab_limit,
                                         stream=on_tokens is not None)
      out, count, hit_eos = jax.device_get((out, count, hit_eos))
      if on_tokens is not None:
        jax.effects_barrier()  # every ordered callback has run before we return
    finally:
      _listener["callback"] = None
  return [Completion(out[i, :count[i]].tolist(), "eos" if hit_eos[i] else "length")
          for i in range(len(prompts))]


_BUCKET = 64


def prefill_length(shortest: int) -> int:
  """Tokens prefilled in parallel for a batch whose shortest prompt has `shortest` tokens: the largest of
  1, 2, 4, ..., 32, 64, 128, 192, ... (powers of two, then multiples of 64) that fits, so that few lengths
  are compiled; at most 63 prompt tokens per row go through decode steps instead."""
  if shortest >= _BUCKET:
    return shortest // _BUCKET * _BUCKET
  return 1 << (shortest.bit_length() - 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "prefix", "max_new_tokens", "sampling", "eos_id",
                                             "vocab_limit", "stream"))
def _decode_loop(graphdef, state, tokens, lengths, row_keys, *, prefix, max_new_tokens, sampling, eos_id,
                 vocab_limit, stream):
  """tokens [b, width] right-padded prompts, lengths [b] -> (out [b, max_new_tokens], count [b], hit_eos [b])."""
  b, width = tokens.shape
  rows = jnp.arange(b)

  def choose(pos, logits, out, count, done, hit_eos):
    """Picks the token at position `pos` of every row from the logits after positions < pos."""
    forced = pos < lengths  # still inside the prompt: the next token is given
    prompt_token = tokens[:, jnp.minimum(pos, width - 1)]
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, pos)
    if vocab_limit is not None:
      logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    sampled = jax.vmap(lambda row, k: sample(row, k, sampling))(logits, keys)
    emit = ~forced & ~done
    stop = emit & (sampled == eos_id) if eos_id is not None else jnp.zeros_like(emit)
    write = emit & ~stop
    slot = jnp.minimum(count, max_new_tokens - 1)
    out = out.at[rows, slot].set(jnp.where(write, sampled, out[rows, slot]))
    count = count + write
    hit_eos = hit_eos | stop
    done = done | stop | (count >= max_new_tokens)
    if stream:
      io_callback(_emit, None, sampled, write, ordered=True)
    return jnp.where(forced, prompt_token, sampled), out, count, done, hit_eos

  model = nnx.merge(graphdef, state, copy=True)
  logits, cache = model.prefill(tokens[:, :prefix], model.init_cache(b))
  zeros = jnp.zeros((b,), jnp.int32)
  falses = jnp.zeros((b,), bool)
  out = jnp.zeros((b, max_new_tokens), jnp.int32)
  carry = (jnp.asarray(prefix, jnp.int32), cache, logits[:, -1], out, zeros, falses, falses)

  def feed(cache, nxt):
    # NNX modules must not cross trace levels: merge a fresh copy inside the traced function.
    return nnx.merge(graphdef, state, copy=True).decode_step(cache, nxt)

  def step(carry):
    pos, cache, logits, out, count, done, hit_eos = carry
    nxt, out, count, done, hit_eos = choose(pos, logits, out, count, done, hit_eos)
    logits, cache = jax.lax.cond(jnp.all(done), lambda c, n: (logits, c), feed, cache, nxt)
    return pos + 1, cache, logits, out, count, done, hit_eos

  _, _, _, out, count, _, hit_eos = jax.lax.while_loop(lambda c: ~jnp.all(c[5]), step, carry)
  return out, count, hit_eos
