"""The output head: logits from the final hidden states, and the loss computed without holding the whole logits.

`Head` is the output head's weight as it is stored: the untied head [D, V], or the tied embedding [V, D], which
the whole-logits path reads untransposed (a transposed tied table costs XLA a copy). `logits(x, head)` is the head
every caller uses (generation, scoring). `head_loss(x, head, targets, mask, chunk=..., z_weight=...)` is the
training and validation loss: summed over the loss mask, the targets' negative log-likelihood, the z-loss's
logsumexp^2 and the top-1 hits, and the objective nll + z_weight * z.

  chunk = 0 or chunk >= t   the logits [b, t, V] (float32) whole, differentiated by autodiff: the reference.
  0 < chunk < t             `lax.scan` over the N = ceil(t / chunk) chunks of `chunk` positions (t padded to
                            N chunk with masked positions): one chunk's logits [b, chunk, V] and their cotangent
                            (float32) live at a time. The gradient is computed in the forward pass
                            (`jax.custom_vjp`): the loss ends the computation, so each chunk's logits serve its
                            value and its gradient at once and nothing is recomputed (Levanter's blockwise
                            cross-entropy and MaxText's vocabulary tiling recompute the chunk in the backward, one
                            more head matmul). The backward scales the saved gradients by the objective's
                            cotangent.

Sequence parallelism (time split over S devices, yanjax.model.partitioning): each device's segment of t / S
positions is chunked on its own (`to_segments`), so a chunk is `chunk` positions of each of the S b segment rows
and no device gathers another's hidden states.

The positions are chunked, not the vocabulary: `chunk` bounds the logits whatever V. The chunked path gathers the
head over FSDP as [D, V] once, before its loop (not once per chunk; on CPU the [V, D] layout is slower in the
loop's matmuls), casts the logits' cotangent to the compute dtype before the two gradient matmuls (bfloat16
matmuls on accelerators, where autodiff would upcast them to float32) and sums the head's gradient over chunks in
float32. tokamax 0.0.12's `linear_softmax_cross_entropy_loss` is not used: its one fused kernel is Mosaic-TPU, its
XLA path materialises the logits, and it has no mask or z-loss.

Shapes: the legend in docs/model.md; here also N = chunks of the loss and `chunk` = positions per chunk.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from yanjax.model.partitioning import SEGMENT_ROWS, constrain, length_ways, to_segments

LOGITS_AXES = ("batch", "length", "vocab")  # logical names of the logits [b, t, V]
CHUNK_AXES = (SEGMENT_ROWS, None, "vocab")  # of a chunk's logits [S b, chunk, V] (S = 1: [b, chunk, V])


class LossSums(NamedTuple):
  """The loss's sums over the positions the mask keeps (float32 [] each); they carry no gradient."""
  nll: jax.Array  # negative log-likelihood of the targets
  z: jax.Array  # logsumexp(logits)^2, the z-loss before its weight
  correct: jax.Array  # targets that are the logits' argmax


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weight"], meta_fields=["vocab_first"])
@dataclasses.dataclass(frozen=True)
class Head:
  """The output head's weight in the compute dtype (`LanguageModel.output_head`)."""
  weight: jax.Array  # [D, V], or [V, D] when vocab_first (the tied embedding)
  vocab_first: bool



def logits(x: jax.Array, head: Head) -> jax.Array:
  """x [b, t, D] in the head's dtype -> logits [b, t, V] float32."""
  return _logits(x, head.weight, "vd" if head.vocab_first else "dv")


def _logits(x, w, w_letters: str, axes=LOGITS_AXES):
  """x [b, t, D], w [D, V] or [V, D] as `w_letters` says -> logits [b, t, V] float32 (logical `axes`)."""
  out = jnp.einsum(f"btd,{w_letters}->btv", x, w, preferred_element_type=jnp.float32)
  return constrain(out, axes)


def head_loss(x: jax.Array, head: Head, targets: jax.Array, mask: jax.Array, *, chunk: int,
              z_weight: float) -> tuple[jax.Array, LossSums]:
  """(objective = nll + z_weight * z [], LossSums) of hidden states x [b, t, D] (the head's dtype), targets
  [b, t] int32 and mask [b, t] (1 = counted), `chunk` positions at a time (0: all); only the objective is
  differentiated (with respect to x and the head)."""
  segments = length_ways(x.shape[1])
  if 0 < chunk < x.shape[1] // segments:
    mask = mask.astype(jnp.float32)
    if segments > 1:  # [S b, t / S, ...]: each device's segments, chunked on their own
      x = to_segments(x, segments, ("embed",))
      targets, mask = (to_segments(a, segments) for a in (targets, mask))
    objective, sums = _chunked_loss(x, head, targets, mask, chunk, float(z_weight))
  else:
    sums, _ = _sums(logits(x, head), targets, mask.astype(jnp.float32))
    objective = sums.nll + z_weight * sums.z
  return objective, jax.tree.map(jax.lax.stop_gradient, sums)


def _sums(chunk_logits, targets, mask) -> tuple[LossSums, jax.Array]:
  """logits [b, t, V] float32 -> (their LossSums, logsumexp [b, t])."""
  logz = jax.nn.logsumexp(chunk_logits, axis=-1)
  picked = jnp.take_along_axis(chunk_logits, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(chunk_logits, axis=-1) == targets).astype(jnp.float32)
  return LossSums(jnp.sum((logz - picked) * mask), jnp.sum(logz ** 2 * mask), jnp.sum(correct * mask)), logz


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_loss(x, head, targets, mask, chunk: int, z_weight: float):
  """head_loss over chunks of `chunk` positions (mask float32): -> (objective, LossSums)."""
  sums, _ = _scan_chunks(x, head, targets, mask, chunk, z_weight, with_grads=False)
  return sums.nll + z_weight * sums.z, sums


def _chunked_loss_fwd(x, head, targets, mask, chunk, z_weight):
  sums, grads = _scan_chunks(x, head, targets, mask, chunk, z_weight, with_grads=True)
  return (sums.nll + z_weight * sums.z, sums), (grads, head.vocab_first)


def _chunked_loss_bwd(chunk, z_weight, saved, cotangents):
  """The objective's gradients saved by the forward, times its cotangent; the sums carry none."""
  del chunk, z_weight
  (dx, dw), vocab_first = saved
  g = cotangents[0]
  return (g * dx).astype(dx.dtype), Head((g * dw).astype(dw.dtype), vocab_first), None, None


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)


def _scan_chunks(x, head: Head, targets, mask, chunk: int, z_weight: float, with_grads: bool):
  """LossSums over the N chunks, and with_grads: the objective's gradients (dx [b, t, D] and dw, the head
  weight's shape, in the dtypes of x and the head; dw summed over the chunks in float32), else None."""
  b, t, _ = x.shape
  n = -(-t // chunk)

  def chunks(a):  # [b, t, ...] -> [N, b, chunk, ...], padded with zeros (masked positions)
    a = jnp.pad(a, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (a.ndim - 2))
    return jnp.swapaxes(a.reshape(b, n, chunk, *a.shape[2:]), 0, 1)

  # Every chunk's three matmuls read the weight [D, V], gathered over FSDP: transposed and gathered once, here.
  w = constrain(head.weight.T if head.vocab_first else head.weight, (None, "vocab"))

  def body(dw, xs):
    x_chunk, target_chunk, mask_chunk = xs
    chunk_logits = _logits(x_chunk, w, "dv", CHUNK_AXES)
    sums, logz = _sums(chunk_logits, target_chunk, mask_chunk)
    if not with_grads:
      return dw, (sums, None)
    # d(nll + z_weight logz^2) / d logits = softmax (1 + 2 z_weight logz) - one_hot(target), on kept positions.
    probs = jnp.exp(chunk_logits - logz[..., None])
    is_target = jnp.arange(chunk_logits.shape[-1], dtype=target_chunk.dtype) == target_chunk[..., None]
    dlogits = jnp.where(is_target, probs - 1.0, probs)
    dlogits = dlogits + (2.0 * z_weight * logz)[..., None] * probs
    dlogits = constrain((dlogits * mask_chunk[..., None]).astype(x.dtype), CHUNK_AXES)
    dx = jnp.einsum("btv,dv->btd", dlogits, w, preferred_element_type=jnp.float32)
    dw = dw + jnp.einsum("btd,btv->dv", x_chunk, dlogits, preferred_element_type=jnp.float32)
    return dw, (sums, dx.astype(x.dtype))

  dw = constrain(jnp.zeros(w.shape, jnp.float32), (None, "vocab")) if with_grads else None
  dw, (sums, dx) = jax.lax.scan(body, dw, (chunks(x), chunks(targets), chunks(mask)))
  sums = LossSums(*(jnp.sum(s) for s in sums))
  if not with_grads:
    return sums, None
  dx = jnp.swapaxes(dx, 0, 1).reshape(b, n * chunk, -1)[:, :t]
  return sums, (dx, (dw.T if head.vocab_first else dw).astype(head.weight.dtype))
