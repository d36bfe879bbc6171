"""Sampling: greedy is argmax, filters keep exactly the right tokens, draws follow the filtered softmax,
seeds reproduce, and the NumPy runtime's sampler applies the same filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yanjax.inference import sampling as jsampling
from yanjax.inference.sampling import (
  Sampling,
  filtered_logits,
  sample,
  top_k_filter,
  top_p_filter,
)
from yanjax.numpy_runtime import sampling as npsampling


def _draws(logits, settings, n, seed=0):
  """n draws for each row of logits [b, v] -> [n, b], one jitted vmap over keys."""
  keys = jax.random.split(jax.random.PRNGKey(seed), n)
  return np.asarray(jax.jit(jax.vmap(lambda k: sample(logits, k, settings)))(keys))


def test_greedy_is_argmax_with_lowest_id_on_ties():
  logits = jnp.array([[0.1, 2.0, 2.0, -1.0], [5.0, 0.0, 0.0, 5.0]])
  np.testing.assert_array_equal(np.asarray(sample(logits, None, Sampling())), [1, 0])
  np.testing.assert_array_equal(npsampling.sample(np.asarray(logits), None), [1, 0])


def test_top_k_one_is_greedy_at_any_temperature():
  logits = jax.random.normal(jax.random.PRNGKey(0), (8, 50))
  draws = _draws(logits, Sampling(temperature=5.0, top_k=1), 50)
  assert np.all(draws == np.argmax(np.asarray(logits), -1))


def test_filters_keep_exactly_the_intended_tokens():
  logits = jnp.array([[3.0, 1.0, 2.0, 2.0, 0.0, -1.0]])
  kept = np.isfinite(np.asarray(top_k_filter(logits, 3)))[0]
  np.testing.assert_array_equal(kept, [True, False, True, True, False, False])
  kept = np.isfinite(np.asarray(top_k_filter(logits, 2)))[0]  # tie at 2.0: the lower id wins
  np.testing.assert_array_equal(kept, [True, False, True, False, False, False])
  probs = np.asarray(jax.nn.softmax(logits))[0]
  order = [0, 2, 3, 1, 4, 5]
  for p in (0.3, 0.6, 0.9, 0.99):
    before = np.cumsum(probs[order]) - probs[order]
    expected = np.zeros(6, bool)
    expected[np.array(order)[before < p]] = True
    np.testing.assert_array_equal(np.isfinite(np.asarray(top_p_filter(logits, p)))[0], expected, err_msg=str(p))
  np.testing.assert_array_equal(np.asarray(top_p_filter(logits, 1.0)), np.asarray(logits))


@pytest.mark.parametrize("settings", [Sampling(1.0), Sampling(0.7), Sampling(1.3, top_k=3),
                                      Sampling(1.0, top_p=0.8), Sampling(2.0, top_k=4, top_p=0.7)])
def test_draw_frequencies_follow_the_filtered_softmax(settings):
  logits = jnp.array([[1.0, 0.5, 0.0, -0.5, -1.0, 0.2]])
  n = 20_000
  draws = _draws(logits, settings, n)[:, 0]
  expected = np.asarray(jax.nn.softmax(filtered_logits(logits, settings)))[0]
  freq = np.bincount(draws, minlength=6) / n
  err = np.max(np.abs(freq - expected))
  print(f"{settings}: max |freq - p| = {err:.4f}")
  assert err < 0.015
  assert np.all(freq[expected == 0] == 0)  # nothing outside top-k / the nucleus is ever drawn


def test_seeds_reproduce_and_differ():
  logits = jnp.zeros((4, 1000))
  settings = Sampling(1.0)
  a = sample(logits, jax.random.PRNGKey(1), settings)
  b = sample(logits, jax.random.PRNGKey(1), settings)
  c = sample(logits, jax.random.PRNGKey(2), settings)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(temperature=float("nan"))])
def test_invalid_settings_name_the_setting(bad):
  (key,) = bad
  with pytest.raises(ValueError, match=key):
    Sampling(**bad)
  with pytest.raises(ValueError, match="key is required"):
    jsampling.sample(jnp.zeros((1, 3)), None, Sampling(1.0))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 5, 1.0), (1.0, 0, 0.6),
                                                     (1.5, 7, 0.9), (1.0, 1, 0.5)])
def test_numpy_runtime_filters_match_jax(temperature, top_k, top_p):
  logits = np.array(jax.random.normal(jax.random.PRNGKey(3), (6, 40)) * 2)
  logits[0, :4] = logits[0, 0]  # ties
  want = np.asarray(filtered_logits(jnp.asarray(logits), Sampling(temperature, top_k, top_p)))
  got = npsampling.filtered_logits(logits, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)
  # and the NumPy draws follow the same distribution
  rng = np.random.default_rng(0)
  draws = npsampling.sample(np.repeat(logits[:1], 8000, axis=0), rng, temperature, top_k, top_p)
  expected = np.asarray(jax.nn.softmax(jnp.asarray(want[0])))
  assert np.max(np.abs(np.bincount(draws, minlength=40) / 8000 - expected)) < 0.025
  assert np.all(np.isfinite(want[0])[draws])
