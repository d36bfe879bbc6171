"""The linear recurrence behind both MCSD sections, in four equivalent forms behind one switch.

    h_t = a_t * h_{t-1} + x_t,    a_t = exp(log_a[t, i]) * (1 - reset_t)

One rate per channel i (shared by the channel's Dc features), fixed (`log_a` [C], MCSD) or per token (`log_a`
[b, t, C], MCSD with data-dependent decay); `reset_t` cuts the state where a new document starts, so packed
documents never see each other. Every form accumulates in float32 whatever the input dtype.

Shapes: the legend in docs/model.md; C counts the recurrence's channels (MCSD runs it over its 2C).

Forms:
  reference    `jax.lax.scan` over time: the slow, obviously-correct definition.
  associative  `jax.lax.associative_scan` over (a_t, x_t) pairs with
               (a1, x1) o (a2, x2) = (a1 a2, a2 x1 + x2): O(log T) depth, the training form.
  chunked      within N chunks of length Lc an [Lc, Lc] decay-mask matmul (the decay from j to i is
               exp(cum_i - cum_j), cum the running sum of log a inside the chunk, as in gated linear attention),
               across chunks a scan over carried states.
  pallas       the chunked form as one fused Pallas kernel, the carry held in registers across chunks, with its
               own backward (yanjax/model/recurrence_kernel.py): Triton on GPUs, Pallas's interpret mode on CPU
               (correct but slow: there for the tests); not on TPU (its Mosaic lowering is not written).
  auto         per backend, from the measurements in benchmarks/RESULTS.md (see AUTO_FORM).

Sequence parallelism (the rules split time over S devices, yanjax.model.partitioning): each device runs the form
over its segment from a zero state; the S (decay through the segment, end state) pairs, one [b, C] and one
[b, C, Dc] per segment, are scanned in order to give each segment the state entering it, and each position adds
that state times its decay from the segment's start (zero after a reset): the same h, summed in another order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from yanjax.model.partitioning import SEGMENT_ROWS, from_segments, length_ways, map_blocks, to_segments
from yanjax.model.recurrence_kernel import fused_recurrence

FORMS = ("reference", "associative", "chunked", "pallas")
# From benchmarks/mixer.py (benchmarks/RESULTS.md). CPU: the sequential scan was fastest or within noise at
# every length. GPU (an H100): "chunked" was fastest at width 2048 and "associative" for narrow models at long
# sequences; neither wins everywhere. TPU: not measured; "chunked", whose matmuls suit its matrix units.
# "pallas" is chosen nowhere until benchmarks/RESULTS.md shows it faster on a backend (benchmarks/accelerator.sh).
AUTO_FORM = {"cpu": "reference", "gpu": "chunked", "tpu": "chunked"}
# Logical axes of what follows the rows [r] of a state [r, C, Dc] and of the rates [r, t, C] after time.
STATE_AXES, RATE_AXES = ("channels", None), ("channels",)


def resolve_form(form: str) -> str:
  if form == "auto":
    return AUTO_FORM.get(jax.default_backend(), "chunked")
  if form not in FORMS:
    raise ValueError(f"unknown recurrence form {form!r}; choose one of {FORMS + ('auto',)}")
  if form == "pallas" and jax.default_backend() == "tpu":
    raise ValueError("recurrence form 'pallas' is a GPU (Triton) kernel; on TPU set model.recurrence to 'chunked'")
  return form


def linear_recurrence(x: jax.Array, log_a: jax.Array, reset: jax.Array, h0: jax.Array | None = None, *,
                      form: str = "auto", chunk_size: int = 64) -> tuple[jax.Array, jax.Array]:
  """Runs h_t = a_t h_{t-1} + x_t over time.

  Args:
    x: [b, t, C, Dc] inputs, any float dtype.
    log_a: [C] log of each channel's rate (negative), or [b, t, C] per token.
    reset: [b, t] bool, True where the state restarts (h_{t-1} is dropped).
    h0: [b, C, Dc] state before the first step (zeros if None).
    form: "reference" | "associative" | "chunked" | "pallas" | "auto".
    chunk_size: Lc, for the chunked and pallas forms (pallas rounds it up to a power of two).
  Returns:
    (h [b, t, C, Dc] float32, h_last [b, C, Dc] float32).
  """
  x = x.astype(jnp.float32)
  log_a = jnp.broadcast_to(log_a.astype(jnp.float32), x.shape[:3])  # [b, t, C]
  if h0 is None:
    h0 = jnp.zeros((x.shape[0],) + x.shape[2:], jnp.float32)
  h0 = h0.astype(jnp.float32)
  form = resolve_form(form)
  segments = length_ways(x.shape[1])
  if segments == 1:
    return _run(form, chunk_size, "batch", x, log_a, reset, h0)
  return _across_segments(form, chunk_size, segments, x, log_a, reset, h0)


def _run(form, chunk_size, rows, x, log_a, reset, h0):
  """(h [r, t, C, Dc], h_last [r, C, Dc]) of one of FORMS over x [r, t, C, Dc] float32, log_a [r, t, C],
  reset [r, t] and h0 [r, C, Dc]; `rows`: the logical axes of the r rows ("batch", or SEGMENT_ROWS)."""
  if form == "pallas":  # rows and channels are independent: each device runs the kernel on its own block
    sequence, state = (rows, None, *STATE_AXES), (rows, *STATE_AXES)
    return map_blocks(lambda *a: fused_recurrence(*a, chunk_size),
                      (sequence, (rows, None, *RATE_AXES), (rows, None), state), (sequence, state),
                      x, log_a, reset, h0)
  if form == "chunked":
    h = _chunked(x, log_a, reset, h0, chunk_size)
  else:
    a = jnp.exp(log_a)[..., None] * (1.0 - reset.astype(jnp.float32))[:, :, None, None]
    h = _reference(a, x, h0) if form == "reference" else _associative(a, x, h0)
  return h, h[:, -1]


def _across_segments(form, chunk_size, segments, x, log_a, reset, h0):
  """`linear_recurrence` (its arguments and results, h0 given) with time split into S = `segments` segments, each
  on its own devices (module doc); segment s of row i is row s b + i of the [S b, t / S, ...] arrays here."""
  b, _, ch, dc = x.shape
  x, log_a, reset = (to_segments(a, segments, axes) for a, axes in
                     ((x, STATE_AXES), (log_a, RATE_AXES), (reset, ())))  # [S b, t / S, ...]
  # h [S b, t / S, C, Dc] and h_end [S b, C, Dc]: each segment's run from a zero state
  h, h_end = _run(form, chunk_size, SEGMENT_ROWS, x, log_a, reset, jnp.zeros((segments * b, ch, dc), jnp.float32))
  # [S b, t / S, C]: the decay from the segment's start to each position, zero from its first reset on
  not_reset = jnp.cumsum(reset.astype(jnp.int32), axis=1) == 0
  from_start = jnp.where(not_reset[..., None], jnp.exp(jnp.cumsum(log_a, axis=1)), 0.0)

  def carry(h_before, segment):  # the state entering a segment -> the state entering the next one
    through, end = segment  # [b, C], [b, C, Dc]
    return through[..., None] * h_before + end, h_before

  h_last, h_enter = jax.lax.scan(carry, h0, (from_start[:, -1].reshape(segments, b, ch),
                                             h_end.reshape(segments, b, ch, dc)))  # h_enter [S, b, C, Dc]
  h = h + from_start[..., None] * h_enter.reshape(segments * b, 1, ch, dc)
  return from_segments(h, segments, STATE_AXES), h_last


def _reference(a, x, h0):
  def step(h, ax):
    a_t, x_t = ax
    h = a_t * h + x_t
    return h, h

  _, h = jax.lax.scan(step, h0, (jnp.swapaxes(a, 0, 1), jnp.swapaxes(x, 0, 1)))
  return jnp.swapaxes(h, 0, 1)


def _associative(a, x, h0):
  x = x.at[:, 0].add(a[:, 0] * h0)

  def combine(left, right):
    a1, x1 = left
    a2, x2 = right
    return a1 * a2, a2 * x1 + x2

  _, h = jax.lax.associative_scan(combine, (a, x), axis=1)
  return h


def _chunked(x, log_a, reset, h0, chunk):
  b, t, ch, dc = x.shape
  chunk = min(chunk, t)
  num_chunks = -(-t // chunk)
  pad = num_chunks * chunk - t
  if pad:
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    log_a = jnp.pad(log_a, ((0, 0), (0, pad), (0, 0)))
    reset = jnp.pad(reset, ((0, 0), (0, pad)))
  x = x.reshape(b, num_chunks, chunk, ch, dc)
  # [b, N, Lc, C]: log of prod_{j<=i} a_j in the chunk
  cum = jnp.cumsum(log_a.reshape(b, num_chunks, chunk, ch), axis=2)
  # Segment index inside each chunk: positions i, j are linked iff no reset lies in (j, i].
  seg = jnp.cumsum(reset.reshape(b, num_chunks, chunk).astype(jnp.int32), axis=-1)  # [b, N, Lc]
  idx = jnp.arange(chunk)
  linked = (idx[:, None] >= idx[None, :])[None, None] & (seg[..., :, None] == seg[..., None, :])  # [b, N, Lc, Lc]
  # Decay from j to i: exp(cum_i - cum_j) <= 1 where linked; masked before exp, where it could overflow.
  log_decay = jnp.moveaxis(cum, -1, 2)[..., :, None] - jnp.moveaxis(cum, -1, 2)[..., None, :]  # [b, N, C, Lc, Lc]
  mask = jnp.exp(jnp.where(linked[:, :, None], log_decay, -jnp.inf))
  intra = jnp.einsum("bncij,bnjcd->bnicd", mask, x)  # [b, N, Lc, C, Dc]
  # Decay from the state entering the chunk to each position (zero once a reset has occurred).
  from_start = jnp.exp(jnp.where((seg == 0)[..., None], cum, -jnp.inf))  # [b, N, Lc, C]

  def carry_across(h_prev, chunk_terms):
    intra_end, decay_end = chunk_terms  # [b, C, Dc], [b, C]
    return intra_end + decay_end[..., None] * h_prev, h_prev

  _, h_enter = jax.lax.scan(carry_across, h0, (jnp.swapaxes(intra[:, :, -1], 0, 1),
                                               jnp.swapaxes(from_start[:, :, -1], 0, 1)))
  h = intra + from_start[..., None] * jnp.swapaxes(h_enter, 0, 1)[:, :, None]
  return h.reshape(b, num_chunks * chunk, ch, dc)[:, :t]
