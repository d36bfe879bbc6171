"""The linear recurrence as one fused Pallas kernel: the chunked form's intra-chunk matmul and the carry across
chunks in one pass over the sequence, forward and backward.

    h_t = a_t * h_{t-1} + x_t,    a_t = exp(log_a[t, i]) * (1 - reset_t)        (yanjax/model/recurrence.py)

One kernel instance owns one row, one channel and a block of Bd of the channel's Dc features, and walks the N
chunks of Lc steps in order, holding the state entering the chunk in registers: per chunk it loads x [Lc, Bd],
forms the [Lc, Lc] decay mask from the running log-rate sum and the chunk's document index, multiplies, adds the
carried state decayed to each step and stores h. The state never goes to memory between chunks, which is what the
`chunked` form's separate scan over chunk ends pays for. Everything is float32.

The backward is the same recurrence run backwards in time (g_t = dh_t + a_{t+1} g_{t+1}), so it is the same kernel
over the reversed cotangents with the rates shifted by one step; then dx = g, dlog_a_t = a_t sum_d(g_t h_{t-1}) and
dh0 = a_0 g_0.

It runs through Triton on GPUs. Anywhere else it runs in Pallas's interpret mode (a `jax.jit` of the kernel as JAX
operations): slow, and there for the tests, which check it on CPU against the reference form.

Shapes: the legend in docs/model.md; C counts the recurrence's channels, Lc is the chunk, Bd the feature block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

FEATURE_BLOCK = 64  # Bd: features per kernel instance (a power of two, as Triton's loads need)
MIN_TILE = 16  # Triton's smallest matmul side: shorter chunks (a decode step's one token) and narrower blocks pad


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def on_gpu() -> bool:
  """Whether the kernel is compiled (Triton, on a GPU) rather than interpreted."""
  return jax.default_backend() == "gpu"


def _chunk_kernel(x_ref, cum_ref, seg_ref, h0_ref, h_ref, h_last_ref, *, chunk: int, num_chunks: int):
  """One (row, channel, feature block): x_ref [N Lc, Bd], cum_ref and seg_ref [N Lc] (running log-rate sum and
  document index inside each chunk), h0_ref [Bd] -> h_ref [N Lc, Bd], h_last_ref [Bd]."""
  row = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  last = jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0) == chunk - 1

  def one_chunk(n, carry):
    span = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
    x = x_ref[span, :]
    cum = cum_ref[span]
    seg = seg_ref[span]
    linked = (row >= col) & (seg[:, None] == seg[None, :])  # j reaches i: no document start in (j, i]
    decay = jnp.where(linked, jnp.exp(jnp.where(linked, cum[:, None] - cum[None, :], 0.0)), 0.0)
    from_start = jnp.where(seg == 0, jnp.exp(cum), 0.0)  # the entering state's decay, 0 after a start
    h = jnp.dot(decay, x, preferred_element_type=jnp.float32) + from_start[:, None] * carry[None, :]
    h_ref[span, :] = h
    return jnp.sum(jnp.where(last, h, 0.0), axis=0)

  h_last_ref[...] = jax.lax.fori_loop(0, num_chunks, one_chunk, h0_ref[...])


def _scan(x, log_a, reset, h0, chunk):
  """The kernel over all rows, channels and feature blocks: x [b, t, C, Dc], log_a [b, t, C], reset [b, t] bool,
  h0 [b, C, Dc], all float32 -> (h [b, t, C, Dc], h_last [b, C, Dc])."""
  b, t, ch, dc = x.shape
  chunk = max(MIN_TILE, _next_power_of_two(min(chunk, t)))
  num_chunks = -(-t // chunk)
  block = max(MIN_TILE, min(FEATURE_BLOCK, _next_power_of_two(dc)))
  pad_t, pad_d = num_chunks * chunk - t, -dc % block
  x = jnp.pad(x, ((0, 0), (0, pad_t), (0, 0), (0, pad_d)))
  log_a = jnp.pad(log_a, ((0, 0), (0, pad_t), (0, 0)))
  reset = jnp.pad(reset, ((0, 0), (0, pad_t)))
  h0 = jnp.pad(h0, ((0, 0), (0, 0), (0, pad_d)))
  cum = jnp.cumsum(log_a.reshape(b, num_chunks, chunk, ch), axis=2).reshape(b, num_chunks * chunk, ch)
  seg = jnp.cumsum(reset.reshape(b, num_chunks, chunk).astype(jnp.int32), axis=-1).reshape(b, num_chunks * chunk)
  length = num_chunks * chunk
  squeezed = pl.squeezed
  h, h_last = pl.pallas_call(
      functools.partial(_chunk_kernel, chunk=chunk, num_chunks=num_chunks),
      out_shape=(jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(h0.shape, jnp.float32)),
      grid=(b, ch, x.shape[-1] // block),
      in_specs=[pl.BlockSpec((squeezed, length, squeezed, block), lambda i, c, d: (i, 0, c, d)),
                pl.BlockSpec((squeezed, length, squeezed), lambda i, c, d: (i, 0, c)),
                pl.BlockSpec((squeezed, length), lambda i, c, d: (i, 0)),
                pl.BlockSpec((squeezed, squeezed, block), lambda i, c, d: (i, c, d))],
      out_specs=[pl.BlockSpec((squeezed, length, squeezed, block), lambda i, c, d: (i, 0, c, d)),
                 pl.BlockSpec((squeezed, squeezed, block), lambda i, c, d: (i, c, d))],
      interpret=not on_gpu(),
      compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=2),
      name="mcsd_linear_recurrence",
  )(x, cum, seg, h0)
  return h[:, :t, :, :dc], h_last[:, :, :dc]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def fused_recurrence(x, log_a, reset, h0, chunk):
  """h_t = a_t h_{t-1} + x_t by the fused kernel.

  Args:
    x: [b, t, C, Dc] float32; log_a: [b, t, C] float32; reset: [b, t] bool; h0: [b, C, Dc] float32.
    chunk: Lc, a Python int (rounded up to a power of two, at least 16; no longer than t needs).
  Returns:
    (h [b, t, C, Dc], h_last [b, C, Dc]), float32.
  """
  return _scan(x, log_a, reset, h0, chunk)


def _forward(x, log_a, reset, h0, chunk):
  h, h_last = fused_recurrence(x, log_a, reset, h0, chunk)
  return (h, h_last), (log_a, reset, h0, h)


def _backward(chunk, residuals, cotangents):
  log_a, reset, h0, h = residuals
  dh, dh_last = cotangents
  dh = dh.at[:, -1].add(dh_last)
  a = jnp.exp(log_a) * (1.0 - reset.astype(jnp.float32))[..., None]  # [b, t, C]
  # Reversed time: step s is t = T-1-s, fed dh_t, with rate a_{t+1} (none at s = 0, where the state is zero).
  next_log_a = jnp.pad(log_a[:, 1:], ((0, 0), (0, 1), (0, 0)))
  next_reset = jnp.pad(reset[:, 1:], ((0, 0), (0, 1)), constant_values=True)
  g, _ = _scan(dh[:, ::-1], next_log_a[:, ::-1], next_reset[:, ::-1], jnp.zeros_like(h0), chunk)
  g = g[:, ::-1]
  previous = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)  # h_{t-1}
  dlog_a = a * jnp.sum(g * previous, axis=-1)
  dh0 = a[:, 0, :, None] * g[:, 0]
  return g, dlog_a, None, dh0


fused_recurrence.defvjp(_forward, _backward)
