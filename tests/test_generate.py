"""Generation: the jitted loop equals step-by-step argmax of full forward passes, a batch of prompts of
different lengths equals each prompt alone (greedy and seeded sampling), it stops at end-of-sequence or the
token limit, streams tokens and text as produced, and the CLI writes what the library generates."""

import argparse
import io
import json
import random
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from model_helpers import random_model

from yanjax.inference import loading as inference
from yanjax.inference.generate import Completion, TextStreamer, generate
from yanjax.inference.sampling import Sampling
from yanjax.main import export as export_cli
from yanjax.main import generate as generate_cli
from yanjax.model.config import ModelConfig

VOCAB = 320  # > the test tokenizer's 300 pieces
PROMPTS = [[1, 17, 40, 9, 250], [1, 33], [1, 5, 6]]


def _model(mixer, **changes):
  cfg = ModelConfig(pattern=(mixer,), vocab_size=VOCAB, width=32, layers=2, channels=4, heads=2, mlp_width=64,
                    max_decode_len=48, **changes)
  return random_model(cfg)


@pytest.fixture(scope="module")
def models():
  return {mixer: _model(mixer) for mixer in ("mcsd", "attention")}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  """A 300-piece byte-fallback BPE model trained on a few KB of generated text (as data_pipelines trains)."""
  rng = random.Random(0)
  words = "the quick brown fox jumps over a lazy dog while state decays slowly across every channel".split()
  lines = [" ".join(rng.choice(words) for _ in range(10)) + rng.choice([".", "!", " café.", " 日本."])
           for _ in range(300)]
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")), vocab_size=300, model_type="bpe",
      byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
  return path


@pytest.mark.parametrize("mixer", ["mcsd", "attention"])
def test_greedy_generation_is_the_argmax_of_a_full_forward_pass(models, mixer):
  """Each generated token is the argmax of the one-pass logits over prompt + the tokens before it."""
  model = models[mixer]
  (completion,) = generate(model, [PROMPTS[0]], max_new_tokens=8)
  seq = PROMPTS[0] + completion.tokens
  logits, _ = model(jnp.asarray([seq]))
  n = len(PROMPTS[0])
  np.testing.assert_array_equal(np.argmax(np.asarray(logits[0, n - 1:-1]), -1), completion.tokens)
  assert completion.stop_reason == "length" and len(completion.tokens) == 8


@pytest.mark.parametrize("mixer", ["mcsd", "attention"])
def test_batch_of_different_lengths_equals_each_prompt_alone(models, mixer):
  model = models[mixer]
  batched = generate(model, PROMPTS, max_new_tokens=10)
  alone = [generate(model, [p], max_new_tokens=10)[0] for p in PROMPTS]
  print([c.tokens for c in batched])
  assert batched == alone
  assert all(len(c.tokens) == 10 and c.stop_reason == "length" for c in batched)


def test_sampling_is_seeded_per_row_whatever_the_batch(models):
  """Row r draws with (seed, row_seeds[r]): alone, or in a batch in another order, it draws the same."""
  model, settings = models["mcsd"], Sampling(1.0, top_k=50, top_p=0.95)
  batched = generate(model, PROMPTS, max_new_tokens=10, sampling=settings, seed=7)
  assert [generate(model, [PROMPTS[i]], max_new_tokens=10, sampling=settings, seed=7, row_seeds=[i])[0]
          for i in (1, 2)] == batched[1:]
  order = [2, 0, 1]
  permuted = generate(model, [PROMPTS[i] for i in order], max_new_tokens=10, sampling=settings, seed=7,
                      row_seeds=order)
  assert permuted == [batched[i] for i in order]
  greedy = generate(model, PROMPTS, max_new_tokens=10)
  other_seed = generate(model, PROMPTS, max_new_tokens=10, sampling=settings, seed=8)
  assert batched != greedy and other_seed != batched  # it really sampled, and the seed matters


def test_stops_at_end_of_sequence(models):
  model = models["mcsd"]
  free = generate(model, PROMPTS, max_new_tokens=10)
  assert max(max(c.tokens) for c in free) >= 40  # (so vocab_limit=40 in the streaming test has work to do)
  tokens = free[0].tokens
  i = next(i for i in range(2, 10) if tokens[i] not in tokens[:i])  # a token first produced at step i
  eos = tokens[i]
  stopped = generate(model, PROMPTS, max_new_tokens=10, eos_id=eos)
  assert stopped[0] == Completion(tokens[:i], "eos")
  for c, f in zip(stopped, free):  # every row stops at its own first eos, or runs to the limit
    cut = f.tokens.index(eos) if eos in f.tokens else None
    assert c == (Completion(f.tokens[:cut], "eos") if cut is not None else f)


def test_streams_tokens_in_order_as_produced(models):
  seen = []
  completions = generate(models["attention"], PROMPTS, max_new_tokens=5, eos_id=None, vocab_limit=40,
                         on_tokens=lambda t, e: seen.append((t.copy(), e.copy())))
  per_row = [[int(t[r]) for t, e in seen if e[r]] for r in range(len(PROMPTS))]
  assert per_row == [c.tokens for c in completions]
  assert max(max(c.tokens) for c in completions) < 40  # ids past the tokenizer's vocabulary never come
  # rows start emitting once their own prompt is used up: the 5-token prompt 3 steps after the 2-token one
  first = [next(i for i, (_, e) in enumerate(seen) if e[r]) for r in range(len(PROMPTS))]
  assert first == [len(p) - 2 for p in PROMPTS]


def test_text_streamer_holds_incomplete_characters(tokenizer):
  processor = spm.SentencePieceProcessor(model_file=str(tokenizer))
  text = "the fox 日本 🙂 café!"
  ids = processor.encode(text)
  assert any(processor.is_byte(i) for i in ids)  # the emoji is byte pieces
  streamer = TextStreamer(processor, 1)
  pieces = [streamer.push(0, i) for i in ids]
  assert "".join(pieces) + streamer.flush(0) == text
  assert all("\ufffd" not in p for p in pieces)


def test_bad_requests_raise_clear_errors(models):
  with pytest.raises(ValueError, match="max_decode_len=48"):
    generate(models["attention"], [[1] * 40], max_new_tokens=10)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate(models["mcsd"], [[1], []], max_new_tokens=3)
  with pytest.raises(ValueError, match=r"prompt 0 has token ids \[320\]"):
    generate(models["mcsd"], [[1, 320]], max_new_tokens=3)


def _args(**flags):
  defaults = dict(workdir="run", prompt=None, prompts_file=None, prompt_ids=None, max_new_tokens=8,
                  temperature=0.0, top_k=0, top_p=1.0, seed=0, batch_size=2, no_bos=False, stream=False)
  return argparse.Namespace(**{**defaults, **flags})


@pytest.mark.slow
def test_cli_streams_one_prompt_and_writes_json_lines_for_a_file(tokenizer, tmp_path, monkeypatch, capsys):
  processor = spm.SentencePieceProcessor(model_file=str(tokenizer))
  model = _model("mcsd", tie_embeddings=False)
  # Zero the head columns of byte, control and unused ids: greedy text is then whole pieces, streamable.
  silent = [i for i in range(VOCAB) if i >= processor.vocab_size() or processor.is_byte(i)
            or processor.is_control(i) or processor.is_unknown(i)]
  model.head[...] = model.head[...].at[:, jnp.asarray(silent)].set(0.0)
  monkeypatch.setattr(inference, "load_inference_model",
                      lambda workdir, mesh_spec=None: (model, model.cfg, str(tokenizer)))

  texts = ["the quick", "the lazy dog jumps over", "日本 café"]
  # Rows are seeded by their line number, so one batch of all the prompts is the reference for every path.
  expected = generate(model, [[1] + processor.encode(t) for t in texts], max_new_tokens=8, eos_id=2,
                      vocab_limit=processor.vocab_size())
  want = expected[0]
  assert not {t for c in expected for t in c.tokens} & set(silent)
  pieces = []
  out = io.StringIO()
  out.write = lambda s, write=out.write: (pieces.append(s), write(s))[1]
  generate_cli.run(model, str(tokenizer), _args(prompt=texts[0]), out=out)
  assert out.getvalue() == processor.decode(want.tokens) + "\n"
  assert len([p for p in pieces if p]) >= 8  # written piece by piece as tokens came, then the newline

  prompt = [1] + processor.encode(texts[0])
  generate_cli.main(["--workdir", "run", "--prompt_ids", ",".join(map(str, prompt)), "--max_new_tokens", "8"])
  assert capsys.readouterr().out == "".join(f"{t} " for t in want.tokens) + f"\n[{want.stop_reason}]\n"

  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
  generate_cli.main(["--workdir", "run", "--prompts_file", str(prompts_file), "--max_new_tokens", "8",
                        "--batch_size", "2"])
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [line["prompt"] for line in lines] == texts
  for line, c in zip(lines, expected):
    assert line["tokens"] == c.tokens and line["stop_reason"] == c.stop_reason
    assert line["completion"] == processor.decode(c.tokens)


@pytest.mark.slow
@pytest.mark.parametrize("variant,arrays", [("", 16), (":mcsd_dd", 18)])  # mcsd_dd: + rate_gate per layer
def test_end_to_end_train_export_generate_and_numpy_runtime(small_store, tmp_path, capsys, variant, arrays):
  """A 4-step training run of yan_tiny (or a variant), then both CLIs on its work directory; the NumPy runtime
  on the export generates the same greedy text as the JAX CLI."""
  import pathlib  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel

  from yanjax.numpy_runtime.__main__ import main as numpy_main  # pylint: disable=import-outside-toplevel

  repo = pathlib.Path(__file__).resolve().parents[1]
  workdir = tmp_path / "run"
  flags = [f"--config={repo / 'configs/yan_tiny.py'}{variant}", f"--config.data.stores=('{small_store}',)",
           "--config.data.prepare_default=False", "--config.train.steps=4", "--config.train.global_batch=4",
           "--config.train.seq_len=32", "--config.train.eval_every=100", "--config.train.sample_tokens=0",
           "--config.optimizer.warmup_steps=2", "--config.checkpoint.every_steps=4",
           "--config.model.vocab_size=512", "--config.model.width=32", "--config.model.channels=2",
           "--config.model.mlp_width=64"]
  done = subprocess.run([sys.executable, "-m", "yanjax.main.train", f"--workdir={workdir}", *flags], cwd=repo,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]

  export_cli.main(["--workdir", str(workdir), "--out", str(tmp_path / "export")])
  assert capsys.readouterr().out.startswith(f"exported {arrays} arrays")
  generate_cli.main(["--workdir", str(workdir), "--prompt", "def main(", "--max_new_tokens", "12"])
  jax_text = capsys.readouterr().out
  numpy_main(["--export", str(tmp_path / "export"), "--prompt", "def main(", "--max_new_tokens", "12"])
  numpy_text = capsys.readouterr().out
  print(repr(jax_text), repr(numpy_text))
  assert len(jax_text) > 1 and jax_text == numpy_text
