"""Tokenizers: a sentencepiece model and a Hugging Face byte-level BPE tokenizer.json behind one interface
(exact round trips, bos/eos framing, ids below vocab_size, kind detection, one-line refusals naming the
source), and their consumers with a tokenizer.json: generation from a workdir, the trainer's sample, export and
the NumPy runtime; a tokenizer with more ids than the model is refused."""

import hashlib
import io
import json
import pathlib
import pickle
import sys
import sysconfig
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import sentencepiece as spm
from flax import nnx
from model_helpers import random_model
from test_inference_sharded import write_checkpoint
from tokenizer_helpers import byte_level_bpe
from tokenizers import Tokenizer as HFTokenizer

from yanjax.core import cli
from yanjax.data import tokenizer as tokenization
from yanjax.data.errors import CorpusError, TokenizerMismatchError
from yanjax.export.writer import export_model
from yanjax.inference import loading as inference
from yanjax.inference.generate import generate
from yanjax.inference.sampling import Sampling
from yanjax.main import generate as generate_cli
from yanjax.model.config import ModelConfig
from yanjax.numpy_runtime import ExportError, load_export
from yanjax.numpy_runtime.__main__ import main as numpy_main
from yanjax.training.hooks import Sample
from yanjax.training.loop import StepInfo

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
TEXTS = ["def f(x):\n    return x  # ok\n", "  two  spaces,\ttab\r\nCRLF\n\n", "café 日本語 🙂 ünïcödé\n", "",
         "literal <|endoftext|> <s> </s> <unk> specials", "\u00a0\u2028 odd spaces\u3000"]
VOCAB = 512  # the test models' vocabulary: > either test tokenizer's


def _corpus() -> list[str]:
  return [(STDLIB / name).read_text(encoding="utf-8")[:6000] for name in ("textwrap.py", "string.py", "abc.py")]


@pytest.fixture(scope="module")
def files():
  """kind -> the bytes of a test tokenizer of that kind; "s_tokens": a tokenizer.json with <s> and </s>."""
  sentences = tokenization.sample_sentences(_corpus(), 20_000)
  return {"sentencepiece": tokenization.train_sentencepiece(sentences, 400, "bpe", 1),
          "huggingface": byte_level_bpe(_corpus(), ["<|endoftext|>"]),
          "s_tokens": byte_level_bpe(_corpus(), ["<pad>", "<s>", "</s>"])}


@pytest.fixture(scope="module")
def toks(files):
  return {kind: tokenization.from_bytes(data, f"{kind}-file") for kind, data in files.items()}


# ---- the interface ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface", "s_tokens"])
def test_round_trip_is_exact_and_documents_are_framed(toks, kind):
  tok = toks[kind]
  for text in TEXTS:
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.decode(np.asarray(ids, np.int32)) == text
    assert tok.bos_id not in ids and tok.eos_id not in ids  # special names in the text are text
  documents = tok.encode_documents(TEXTS)
  assert len(documents) == len(TEXTS)
  for text, doc in zip(TEXTS, documents):
    assert doc.dtype == np.int32 and doc.ndim == 1
    assert doc.tolist() == [tok.bos_id, *tok.encode(text), tok.eos_id]
  assert tok.decode(documents[0]) == TEXTS[0]  # bos and eos give no text


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface", "s_tokens"])
def test_token_bytes_add_up_to_the_texts_bytes(toks, kind):
  """Bits per byte's denominator: byte-fallback pieces, partial characters of byte-level BPE and "▁" included;
  bos, eos (and sentencepiece's <unk>) are no text."""
  tok = toks[kind]
  table = tok.token_bytes()
  assert table.shape == (tok.vocab_size,) and table.dtype == np.int32 and table.min() >= 0
  for text in TEXTS + _corpus():
    assert int(table[tok.encode(text)].sum()) == len(text.encode("utf-8")), text[:40]
  assert table[tok.bos_id] == table[tok.eos_id] == 0 and (tok.unk_id is None or table[tok.unk_id] == 0)


def test_vocab_size_bounds_every_id(toks, files):
  hf = HFTokenizer.from_str(files["huggingface"].decode())
  assert toks["huggingface"].vocab_size == hf.get_vocab_size(with_added_tokens=True) == 400
  assert max(hf.get_vocab(with_added_tokens=True).values()) == 399
  assert toks["sentencepiece"].vocab_size == spm.SentencePieceProcessor(model_proto=files["sentencepiece"]).vocab_size()
  text = "".join(_corpus()) + "".join(TEXTS) + "".join(chr(c) for c in range(32, 3000))
  for tok in toks.values():
    ids = tok.encode(text)
    assert 0 <= min(ids) and max(ids) < tok.vocab_size
    assert max(tok.bos_id, tok.eos_id, tok.unk_id or 0) < tok.vocab_size


def test_kind_file_name_metadata_and_special_ids(toks, files):
  sp, hf, s_tokens = toks["sentencepiece"], toks["huggingface"], toks["s_tokens"]
  assert (sp.kind, sp.file_name, sp.bos_id, sp.eos_id, sp.unk_id) == ("sentencepiece", "tokenizer.model", 1, 2, 0)
  assert (hf.kind, hf.file_name, hf.unk_id) == ("huggingface", "tokenizer.json", None)
  assert hf.bos_id == hf.eos_id == 0  # <|endoftext|> alone: both (GPT-2)
  assert (s_tokens.bos_id, s_tokens.eos_id) == (1, 2)  # <s>, </s> preferred to <|endoftext|>-less fallbacks
  assert hf.metadata() == {"kind": "huggingface", "file": "tokenizer.json",
                           "sha256": hashlib.sha256(files["huggingface"]).hexdigest(), "vocab_size": 400,
                           "unk_id": None, "bos_id": 0, "eos_id": 0}
  assert json.loads(json.dumps(sp.metadata()))["file"] == "tokenizer.model"
  assert sp.data == files["sentencepiece"] and sp.sha256 == hashlib.sha256(sp.data).hexdigest()
  again = pickle.loads(pickle.dumps(hf))  # worker processes get it as its file
  assert again.encode(TEXTS[2]) == hf.encode(TEXTS[2]) and again.source == "huggingface-file"
  assert tokenization.from_bytes(b"\n  " + files["huggingface"], "x").kind == "huggingface"


def test_a_tokenizer_json_ignores_its_truncation_and_padding(files):
  hf = HFTokenizer.from_str(files["huggingface"].decode())
  hf.enable_truncation(max_length=4)
  hf.enable_padding(length=64)
  tok = tokenization.from_bytes(hf.to_str().encode(), "truncating.json")
  assert len(tok.encode(TEXTS[0])) > 4 and tok.decode(tok.encode(TEXTS[0])) == TEXTS[0]
  assert [len(d) for d in tok.encode_documents(TEXTS[:2])] == [len(tok.encode(t)) + 2 for t in TEXTS[:2]]


def _sentencepiece_without_bos_eos() -> bytes:
  model = io.BytesIO()
  spm.SentencePieceTrainer.Train(sentence_iterator=iter(tokenization.sample_sentences(_corpus(), 20_000)),
                                 model_writer=model, vocab_size=400, byte_fallback=True, bos_id=-1, eos_id=-1,
                                 minloglevel=2, num_threads=1)
  return model.getvalue()


REFUSALS = {
    "garbage bytes": (lambda files: b"\x00\x01 not a model \xff", "neither JSON nor a sentencepiece model"),
    "JSON without a model key": (lambda files: b'{"vocab": {"a": 0}}', 'JSON without a "model" key'),
    "a JSON list": (lambda files: b"[1, 2]", 'JSON without a "model" key'),
    "invalid JSON": (lambda files: b'{"model": {"type": "BPE", ', "invalid JSON"),
    "a model tokenizers cannot read": (lambda files: b'{"model": 3}', "the tokenizers library cannot read it"),
    "tokenizer.json without bos": (lambda files: byte_level_bpe(_corpus(), ["<pad>", "</s>"], 300),
                                   "no special token for bos, .*<\\|begin_of_text\\|>, <s>, <bos>"),
    "tokenizer.json without eos": (lambda files: byte_level_bpe(_corpus(), ["<pad>", "<s>"], 300),
                                   "no special token for eos, .*<\\|end_of_text\\|>, </s>, <eos>"),
    "sentencepiece without bos/eos": (lambda files: _sentencepiece_without_bos_eos(), "defines no bos or eos"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line_naming_the_source(files, case):
  make, reason = REFUSALS[case]
  with pytest.raises(TokenizerMismatchError, match=reason) as caught:
    tokenization.from_bytes(make(files), "--tokenizer_model some/file.x")
  message = str(caught.value)
  print(message)
  assert message.startswith("--tokenizer_model some/file.x") and "\n" not in message


def test_find_file_of_a_directory(tmp_path, files):
  assert tokenization.find_file(tmp_path) is None
  (tmp_path / "tokenizer.json").write_bytes(files["huggingface"])
  assert tokenization.find_file(tmp_path) == tmp_path / "tokenizer.json"
  (tmp_path / "tokenizer.model").write_bytes(files["sentencepiece"])
  with pytest.raises(TokenizerMismatchError, match="holds both tokenizer.model and tokenizer.json: remove"):
    tokenization.find_file(tmp_path)


# ---- consumers: generate, the trainer's sample, export and the NumPy runtime ------------------------

def _streamable_model(tok, seed=1):
  """A model of VOCAB ids whose head never favours ids the streamer holds back (partial UTF-8, special)."""
  cfg = ModelConfig(vocab_size=VOCAB, width=32, layers=2, channels=4, heads=2, mlp_width=64,
                    max_decode_len=64, tie_embeddings=False)
  model = random_model(cfg, seed=seed)
  silent = [i for i in range(VOCAB) if i >= tok.vocab_size or i in (tok.bos_id, tok.eos_id)
            or "\ufffd" in tok.decode([i]) or not tok.decode([i])]
  model.head[...] = model.head[...].at[:, jnp.asarray(silent)].set(0.0)
  return model, silent


def _expected(model, tok, prompt, n):
  (completion,) = generate(model, [[tok.bos_id] + tok.encode(prompt)], max_new_tokens=n, eos_id=tok.eos_id,
                           vocab_limit=tok.vocab_size)
  return completion


@pytest.mark.slow
def test_generate_from_a_workdir_with_a_tokenizer_json(toks, files, tmp_path, capsys, monkeypatch):
  tok = toks["huggingface"]
  model, silent = _streamable_model(tok)
  workdir = tmp_path / "run"
  write_checkpoint(workdir, model)
  (workdir / "tokenizer.json").write_bytes(files["huggingface"])
  want = _expected(model, tok, "def main(", 10)
  assert not set(want.tokens) & set(silent) and want.tokens
  generate_cli.main(["--workdir", str(workdir), "--prompt", "def main(", "--max_new_tokens", "10"])
  assert capsys.readouterr().out == tok.decode(want.tokens) + "\n"
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("def main(\ncafé 日本\n", encoding="utf-8")
  generate_cli.main(["--workdir", str(workdir), "--prompts_file", str(prompts), "--max_new_tokens", "10"])
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [line["prompt"] for line in lines] == ["def main(", "café 日本"]
  assert lines[0]["tokens"] == want.tokens and lines[0]["completion"] == tok.decode(want.tokens)

  # A run whose store's tokenizer changed kind: the workdir holds one file or the other, never both.
  (workdir / "tokenizer.model").write_bytes(files["sentencepiece"])
  with pytest.raises(TokenizerMismatchError, match="holds both"):
    inference.load_inference_model(workdir)
  (workdir / "tokenizer.json").unlink()
  (workdir / "tokenizer.model").unlink()
  monkeypatch.setattr(sys, "argv", ["generate"])
  with pytest.raises(SystemExit) as exit_info:
    cli.run(lambda: generate_cli.main(["--workdir", str(workdir), "--prompt", "x"]))
  assert exit_info.value.code == cli.USAGE_EXIT_CODE
  assert capsys.readouterr().err == (f"error: {workdir} has no tokenizer.model or tokenizer.json: give "
                                     "--prompt_ids instead of text\n")


@pytest.mark.parametrize("kind", ["huggingface", "sentencepiece"])
def test_generate_refuses_a_tokenizer_larger_than_the_model(files, tmp_path, capsys, monkeypatch, kind):
  model = random_model(ModelConfig(vocab_size=97, width=32, layers=2, channels=4, mlp_width=64))
  path = tmp_path / tokenization.FILE_NAMES[kind]
  path.write_bytes(files[kind])
  monkeypatch.setattr(inference, "load_inference_model", lambda workdir, mesh_spec=None: (model, model.cfg, path))
  monkeypatch.setattr(sys, "argv", ["generate"])
  for source in (["--prompt", "def"], ["--prompt_ids", "0,5"]):
    with pytest.raises(SystemExit) as exit_info:
      cli.run(lambda source=source: generate_cli.main(["--workdir", "run", *source]))
    assert exit_info.value.code == cli.USAGE_EXIT_CODE
    assert capsys.readouterr().err == (f"error: {path} has 400 ids but the checkpoint's model has vocab_size 97: "
                                       "use the tokenizer the run was trained with\n")


def test_the_trainers_sample_uses_the_workdirs_tokenizer_json(toks, files, tmp_path, capsys):
  tok = toks["huggingface"]
  model, _ = _streamable_model(tok)
  (tmp_path / "tokenizer.json").write_bytes(files["huggingface"])
  train_cfg = ml_collections.ConfigDict({"sample_prompt": "class A(", "sample_tokens": 8, "seed": 3})
  graphdef, params = nnx.split(model)
  Sample(graphdef, train_cfg, tmp_path)(StepInfo(step=1, start=0, state={"params": params}, metrics={}, last=True))
  prompt = [tok.bos_id] + tok.encode("class A(")
  (completion,) = generate(model, [prompt], max_new_tokens=8, sampling=Sampling(temperature=0.7, top_p=0.9),
                           eos_id=tok.eos_id, seed=3, vocab_limit=tok.vocab_size)
  text = tok.decode(prompt[1:] + completion.tokens)
  assert text.startswith("class A(") and (tmp_path / "sample.txt").read_text() == text + "\n"
  assert f"\n{text}\n" in capsys.readouterr().out


def test_export_ships_a_tokenizer_json_and_the_numpy_runtime_uses_it(toks, files, tmp_path, capsys):
  tok = toks["huggingface"]
  model, _ = _streamable_model(tok, seed=2)
  (tmp_path / "tokenizer.json").write_bytes(files["huggingface"])
  out = tmp_path / "export"
  manifest = export_model(model, model.cfg, out, tokenizer_path=tmp_path / "tokenizer.json")
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "tokenizer.json", "weights.npz"]
  assert manifest["tokenizer"] == {**tok.metadata(), "bytes": len(files["huggingface"])}
  assert manifest["files"]["tokenizer.json"]["sha256"] == tok.sha256
  assert load_export(out).tokenizer_path == out / "tokenizer.json"
  want = _expected(model, tok, "def main(", 8)
  numpy_main(["--export", str(out), "--prompt", "def main(", "--max_new_tokens", "8"])
  assert capsys.readouterr().out == tok.decode(want.tokens) + "\n"

  # The manifest's kind is checked against the file; an export from before "kind" is sentencepiece.
  manifest_file = out / "manifest.json"
  manifest_file.write_text(json.dumps({**manifest, "tokenizer": {**manifest["tokenizer"], "kind": "sentencepiece"}}))
  with pytest.raises(ExportError, match=r"tokenizer\.json: a huggingface tokenizer, but the manifest says sentencep"):
    numpy_main(["--export", str(out), "--prompt", "def", "--max_new_tokens", "2"])
  sp = toks["sentencepiece"]
  (tmp_path / "tokenizer.model").write_bytes(files["sentencepiece"])
  manifest = export_model(model, model.cfg, out, tokenizer_path=tmp_path / "tokenizer.model")  # replaces it
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "tokenizer.model", "weights.npz"]
  assert manifest["tokenizer"]["kind"] == "sentencepiece" and manifest["tokenizer"]["file"] == "tokenizer.model"
  old = {key: value for key, value in manifest["tokenizer"].items() if key != "kind"}
  manifest_file.write_text(json.dumps({**manifest, "tokenizer": {**old, "pad_id": -1}}))
  numpy_main(["--export", str(out), "--prompt", "def main(", "--max_new_tokens", "8"])
  assert capsys.readouterr().out == sp.decode(_expected(model, sp, "def main(", 8).tokens) + "\n"

  small = random_model(ModelConfig(vocab_size=97, width=32, layers=2, channels=4, mlp_width=64))
  with pytest.raises(TokenizerMismatchError, match="tokenizer.json: the tokenizer has 400 pieces but the model's "
                                                   "vocab_size is 97"):
    export_model(small, small.cfg, tmp_path / "small", tokenizer_path=tmp_path / "tokenizer.json")


def test_the_trainer_writes_the_stores_tokenizer_under_its_own_name(files, tmp_path):
  """A workdir holds the tokenizer of the data its checkpoints saw; switching kind removes the other file."""
  from yanjax.main import train  # pylint: disable=import-outside-toplevel  # defines absl flags
  (tmp_path / "notes.txt").write_text("mine")
  for kind, other in (("sentencepiece", "huggingface"), ("huggingface", "sentencepiece")):
    train.write_tokenizer(tmp_path, types.SimpleNamespace(tokenizer_bytes=lambda kind=kind: files[kind]))
    assert (tmp_path / tokenization.FILE_NAMES[kind]).read_bytes() == files[kind]
    assert not (tmp_path / tokenization.FILE_NAMES[other]).exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "tokenizer.json"]


@pytest.mark.parametrize("vocab_size, fix", [(100, "Raise --vocab_size"), (100_000, "Lower --vocab_size")])
def test_a_failed_tokenizer_training_says_which_way_to_move_the_vocabulary(vocab_size, fix):
  sentences = tokenization.sample_sentences(_corpus(), 20_000)
  with pytest.raises(CorpusError, match=fix) as caught:
    tokenization.train_sentencepiece(sentences, vocab_size, "bpe", num_threads=1)
  assert "\n" not in str(caught.value)
