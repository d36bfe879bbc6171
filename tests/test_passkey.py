"""Passkey retrieval (yanjax/eval/passkey.py): the trials are what they say, and the scores are the model's own
log-probabilities and argmaxes over one full forward pass."""

import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from yanjax.core.errors import UserError
from yanjax.data import tokenizer as tokenization
from yanjax.data.store import open_store
from yanjax.eval import passkey
from yanjax.eval.scoring import JaxBackend
from yanjax.model.config import ModelConfig
from yanjax.model.lm import LanguageModel


@pytest.fixture(scope="module")
def corpus(small_store):
  """(the store's tokenizer, 3000 haystack ids from its validation documents)."""
  store = open_store(small_store)
  return tokenization.from_bytes(store.tokenizer_bytes(), str(small_store)), passkey.haystack_ids(store, 3000)


def _model(mixer, **changes):
  cfg = ModelConfig(vocab_size=512, width=32, layers=2, channels=4, heads=2, mlp_width=64, pattern=(mixer,), **changes)
  return LanguageModel(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_a_trial_is_context_tokens_with_the_needle_at_its_depth(corpus, depth):
  tok, haystack = corpus
  assert len(haystack) >= 3000 and tok.bos_id not in haystack and tok.eos_id not in haystack
  [(trial, control)] = passkey.trials_for(tok, haystack, 300, depth, 1, seed=7)
  assert trial == passkey.trials_for(tok, haystack, 300, depth, 1, seed=7)[0][0]  # every model: the same trials
  query = tok.encode(passkey.QUERY)
  for made, stated in ((trial, trial.key), (control, None)):
    assert len(made.tokens) == 300 and made.tokens[0] == tok.bos_id and made.key == trial.key
    assert tok.decode(made.tokens[made.answer_start:]) == str(trial.key) and len(str(trial.key)) == 5
    assert made.tokens[made.answer_start - len(query):made.answer_start] == query
    text = tok.decode(made.tokens)
    assert text.count("The pass key is ") == 2  # stated once, asked once
    assert (f"The pass key is {trial.key}. Remember it." in text) == (stated is not None)
  needle = tok.encode(passkey.NEEDLE.format(key=trial.key))
  filler = 300 - 1 - len(needle) - len(query) - (300 - trial.answer_start)
  at = 1 + round(depth * filler)
  assert trial.tokens[at:at + len(needle)] == needle


@pytest.mark.parametrize("mixer", ["mcsd", "attention"])
def test_scores_are_the_models_own_over_one_forward_pass(corpus, mixer):
  tok, haystack = corpus
  model = _model(mixer, max_decode_len=512)
  rows = passkey.passkey_accuracy(JaxBackend(model), tok, haystack, contexts=[260], depths=[0.25], trials=2,
                                  seed=1, window=130)  # 2 windows through the state or the cache
  trials = [t for pair in passkey.trials_for(tok, haystack, 260, 0.25, 2, seed=1) for t in pair]
  logits, _ = nnx.jit(lambda m, tokens: m(tokens))(model, np.array([t.tokens for t in trials], np.int32))
  log_probs = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1))
  answer_logprobs, greedy = [], []
  for row, trial in zip(log_probs, trials):
    positions = np.arange(trial.answer_start - 1, len(trial.tokens) - 1)  # logits at j predict token j + 1
    answer = np.array(trial.tokens[trial.answer_start:])
    answer_logprobs.append(row[positions, answer].sum())
    greedy.append(bool(np.all(row[positions].argmax(-1) == answer)))
  [result] = rows
  print(result, answer_logprobs)
  assert result["fits"] and result["trials"] == 2 and result["retrieved"] == sum(greedy[0::2])
  np.testing.assert_allclose(result["answer_logprob"], np.mean(answer_logprobs[0::2]), rtol=1e-4)
  gains = np.array(answer_logprobs[0::2]) - np.array(answer_logprobs[1::2])
  np.testing.assert_allclose(result["needle_gain"], np.mean(gains), rtol=1e-4, atol=1e-5)


def test_a_context_beyond_the_kv_cache_is_reported_not_truncated(corpus):
  tok, haystack = corpus
  rows = passkey.passkey_accuracy(JaxBackend(_model("attention", max_decode_len=128)), tok, haystack,
                                  contexts=[512], depths=[0.5], trials=1)
  assert rows == [{"context": 512, "depth": 0.5, "trials": 1, "fits": False, "retrieved": None,
                   "accuracy": None, "answer_logprob": None, "needle_gain": None}]
  with pytest.raises(UserError, match="too short for the needle"):
    passkey.make_trial(tok, haystack, 16, 0.5, key=12345, offset=0.0)
  with pytest.raises(UserError, match="within \\[0, 1\\]"):
    passkey.passkey_accuracy(JaxBackend(_model("mcsd")), tok, haystack, contexts=[256], depths=[1.5])


def test_the_benchmarks_table_and_refusals(small_store, tmp_path, capsys):
  import sys  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
  import passkey as bench  # pylint: disable=import-outside-toplevel
  rows = [{"family": "mcsd", "context": 256, "fits": True, "retrieved": 1, "trials": 2, "needle_gain": 1.0},
          {"family": "mcsd", "context": 256, "fits": True, "retrieved": 2, "trials": 2, "needle_gain": 2.0},
          {"family": "attention", "context": 256, "fits": False, "retrieved": None, "trials": 2}]
  assert bench.table(rows, [256])[2:] == ["| mcsd | 3/4, +1.50 |", "| attention | does not fit |"]
  assert bench.parse_runs("mcsd=a,attention=b") == {"mcsd": "a", "attention": "b"}
  for argv, fragment in ((["--runs", "gpt=runs/x"], "write family=workdir with family one of"),
                         (["--runs", "mcsd=" + str(tmp_path)], "holds no tokenizer.model or tokenizer.json"),
                         (["--runs", "mcsd=a", "--contexts", "1k"], "--contexts='1k': give numbers")):
    with pytest.raises(SystemExit) as exit_info:
      bench.main(["--out", str(tmp_path / "out"), "--store", str(small_store), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err
