"""The output head's loss in chunks of positions == the whole logits: sums (against float64 NumPy) and gradients
(against autodiff of the whole logits), with a mask, chunks that do not divide the sequence, tied and untied
heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import random_model

from yanjax.model.config import ModelConfig
from yanjax.model.head import Head, head_loss

Z_WEIGHT = 0.1  # large enough that the z-loss's share of the gradient shows


def _reference_sums(logits, targets, mask):
  """(nll, z, correct) sums in float64 NumPy from the whole logits [b, t, V]."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1)
  logz = top + np.log(np.exp(logits - top[..., None]).sum(-1))
  picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  correct = logits.argmax(-1) == targets
  return np.sum((logz - picked) * mask), np.sum(logz ** 2 * mask), np.sum(correct * mask)


# chunk: divides t = 12; does not (the last chunk padded); 11 (a last chunk of one position). vocab_first: the
# tied embedding's layout.
@pytest.mark.parametrize("chunk,vocab_first", [(4, False), (5, True), (11, False)])
def test_chunked_loss_and_gradients_equal_the_whole_logits(chunk, vocab_first):
  rng = np.random.default_rng(0)
  b, t, d, v = 3, 12, 16, 40
  x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  w = rng.standard_normal((d, v)).astype(np.float32)
  targets = rng.integers(0, v, (b, t)).astype(np.int32)
  targets[:, ::2] = np.argmax(np.asarray(x) @ w, -1)[:, ::2]  # half the positions predicted right
  mask = (rng.random((b, t)) > 0.25).astype(np.float32)
  head = Head(jnp.asarray(w.T if vocab_first else w), vocab_first)

  @jax.jit
  def loss_and_grads(x, head):
    def loss(x, head, chunk):
      return head_loss(x, head, targets, mask, chunk=chunk, z_weight=Z_WEIGHT)
    return [jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, head, c) for c in (chunk, 0)]

  ((objective, sums), grads), ((whole_objective, _), whole_grads) = loss_and_grads(x, head)
  grads, whole_grads = ((dx, dhead.weight) for dx, dhead in (grads, whole_grads))
  nll, z, correct = _reference_sums(np.asarray(x) @ w, targets, mask)
  diffs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads, whole_grads)]
  print(f"chunk {chunk}: nll {float(sums.nll)} vs {nll}, z {float(sums.z)} vs {z}, correct {float(sums.correct)} "
        f"vs {correct}; objective diff {abs(float(objective - whole_objective))}, max |grad diff| x, w: {diffs}")
  np.testing.assert_allclose([sums.nll, sums.z], [nll, z], rtol=1e-5)
  assert float(sums.correct) == correct >= b * t // 4
  np.testing.assert_allclose(objective, nll + Z_WEIGHT * z, rtol=1e-5)
  np.testing.assert_allclose(objective, whole_objective, rtol=1e-6)
  for chunked, whole in zip(grads, whole_grads):
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(grads[0] * (1 - mask[..., None])))) == 0.0  # masked positions get no gradient


@pytest.mark.parametrize("tie", [True, False])
def test_the_models_output_head_gives_its_logits_and_gradients_through_the_chunked_loss(tie):
  """hidden_states + output_head == __call__'s logits; the loss's gradients with respect to every parameter
  (the embedding as input table and tied head, or the untied head) equal the whole logits'."""
  cfg = ModelConfig(vocab_size=64, width=16, layers=1, channels=2, mlp_width=32, tie_embeddings=tie)
  model = random_model(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, cfg.vocab_size)
  targets = jnp.roll(tokens, -1, axis=1)
  mask = jnp.ones(tokens.shape).at[:, -1].set(0.0)

  @nnx.jit
  def run(model):
    def loss(model, chunk):
      x, _ = model.hidden_states(tokens)
      return head_loss(x, model.output_head(x.dtype), targets, mask, chunk=chunk, z_weight=Z_WEIGHT)[0]
    logits, _ = model(tokens)
    x, _ = model.hidden_states(tokens)
    return logits, x, model.output_head(x.dtype).weight, [nnx.grad(loss)(model, chunk) for chunk in (4, 0)]

  logits, x, w, (grads, whole_grads) = run(model)
  np.testing.assert_allclose(np.asarray(x) @ np.asarray(w.T if tie else w), logits, atol=1e-5)
  flat, whole_flat = (nnx.to_flat_state(nnx.state(g)) for g in (grads, whole_grads))
  for (path, chunked), (_, whole) in zip(flat, whole_flat):
    print(path, float(jnp.max(jnp.abs(chunked[...] - whole[...]))))
    np.testing.assert_allclose(chunked[...], whole[...], rtol=1e-5, atol=1e-6)
  assert (("head",) in [path for path, _ in flat]) == (not tie)
