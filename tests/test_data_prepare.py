"""Preparation tests on tiny corpora: round trip, store contents, formats, bad input, atomicity, resumption."""

import gzip
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines.prepare import main as prepare_main
from data_pipelines.prepare import parse_settings
from yanjax.data import content, prepare, sources, store_writer
from yanjax.data.errors import CorpusError, StoreError, TokenizerMismatchError
from yanjax.data.store import TEMP_MARKER, open_store

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 400
UNICODE_TEXT = "naïve café — 日本語 😀\r\n\ttabs,  spaces\x00 and a NUL\n"
STDLIB_MODULES = ("textwrap.py", "bisect.py", "colorsys.py", "json/decoder.py", "json/encoder.py",
                  "keyword.py", "this.py", "queue.py")


def corpus_texts() -> list[str]:
  """Real text: a few standard-library modules and a line of non-ASCII text."""
  return [(sources.stdlib_root() / name).read_text() for name in STDLIB_MODULES] + [UNICODE_TEXT]


def write_text_corpus(directory: pathlib.Path) -> list[str]:
  directory.mkdir(parents=True)
  texts = corpus_texts()
  for i, text in enumerate(texts):
    (directory / f"doc{i:02d}.txt").write_bytes(text.encode("utf-8"))
  return texts


def run_prepare(output: pathlib.Path, *argv: str):
  args = ["--output", str(output), "--vocab_size", str(VOCAB), "--tokenizer_sample_bytes", "200000",
          "--validation_fraction", "0.25", "--input_shard_bytes", "20000", "--no_progress", *argv]
  return prepare.prepare_store(parse_settings(args))


def stored_documents(store, split: str) -> list[np.ndarray]:
  return [store.split(split).document(i) for i in range(store.num_documents[split])]


@pytest.fixture(scope="module")
def text_store(tmp_path_factory):
  """(store, corpus directory, texts) prepared once from the text corpus."""
  root = tmp_path_factory.mktemp("prepared")
  texts = write_text_corpus(root / "corpus")
  # The first seed that gives both splits documents.
  digests = [content.digest(text) for text in texts]
  seed = next(s for s in range(1000) if 0 < sum(content.is_validation(s, d, 0.25) for d in digests) < len(texts))
  run_prepare(root / "store", str(root / "corpus"), "--seed", str(seed))
  return open_store(root / "store"), root / "corpus", texts


def test_text_tokens_text_round_trip(text_store):
  store, _, texts = text_store
  processor = store.tokenizer()
  for text in texts:
    assert processor.decode(processor.encode(text)) == text
  decoded = [processor.decode(doc[1:-1].tolist()) for split in ("train", "validation")
             for doc in stored_documents(store, split)]
  assert sorted(decoded) == sorted(texts)


def test_store_equals_direct_tokenization(text_store):
  store, corpus, texts = text_store
  processor = store.tokenizer()
  expected = {"train": [], "validation": []}
  for text in texts:  # the files' order is the texts' order
    held_out = content.is_validation(store.metadata["settings"]["seed"], content.digest(text), 0.25)
    ids = [store.bos_id] + processor.encode(text) + [store.eos_id]
    expected["validation" if held_out else "train"].append(ids)
  assert expected["train"] and expected["validation"]
  for split, documents in expected.items():
    assert [doc.tolist() for doc in stored_documents(store, split)] == documents
    assert store.num_tokens[split] == sum(map(len, documents))
  assert store.metadata["token_dtype"] == "uint16" and store.vocab_size == VOCAB
  assert store.split("train").tokens.dtype.numpy_dtype == np.uint16
  assert store.metadata["sources"]["num_documents"] == len(texts)
  assert store.metadata["sources"]["num_units"] > 2  # several shards, concatenated in input order
  assert len(store.metadata["splits"]["train"]["shards"]) > 1


def test_jsonl_gz_parquet_and_glob_inputs(tmp_path):
  texts = corpus_texts()
  records = [json.dumps({"content": t, "id": i}) for i, t in enumerate(texts[:4])]
  (tmp_path / "a.jsonl").write_text("\n".join(records[:2]) + "\n\n")
  with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
    f.write("\n".join(records[2:]))
  pq.write_table(pa.table({"content": texts[4:7] + [None]}), tmp_path / "c.parquet")
  for i, text in enumerate(texts[7:]):
    (tmp_path / f"d{i}.txt").write_text(text)
  run_prepare(tmp_path / "store", str(tmp_path / "*.jsonl*"), str(tmp_path / "c.parquet"),
              str(tmp_path / "d*.txt"), "--text_field", "content")
  store = open_store(tmp_path / "store")
  processor = store.tokenizer()
  decoded = [processor.decode(doc[1:-1].tolist()) for split in ("train", "validation")
             for doc in stored_documents(store, split)]
  assert sorted(decoded) == sorted(texts)
  assert store.metadata["sources"]["empty_documents"] == 1  # the parquet null


@pytest.mark.slow
def test_rerun_is_a_noop_and_changed_inputs_need_overwrite(tmp_path, capsys):
  write_text_corpus(tmp_path / "corpus")
  run_prepare(tmp_path / "store", str(tmp_path / "corpus"))
  metadata = tmp_path / "store" / "metadata.json"
  before = metadata.stat().st_mtime_ns
  capsys.readouterr()
  run_prepare(tmp_path / "store", str(tmp_path / "corpus"))
  assert "up to date" in capsys.readouterr().out and metadata.stat().st_mtime_ns == before
  with pytest.raises(StoreError, match="--overwrite"):
    run_prepare(tmp_path / "store", str(tmp_path / "corpus"), "--validation_fraction", "0.5")
  (tmp_path / "corpus" / "extra.txt").write_text("one more document\n")
  with pytest.raises(StoreError, match="--overwrite"):
    run_prepare(tmp_path / "store", str(tmp_path / "corpus"))
  run_prepare(tmp_path / "store", str(tmp_path / "corpus"), "--overwrite")
  assert open_store(tmp_path / "store").metadata["sources"]["num_files"] == len(corpus_texts()) + 1
  assert not list(tmp_path.glob(f"store{TEMP_MARKER}*")) and not list(tmp_path.glob("store.old-*"))


@pytest.mark.slow
def test_bad_inputs_are_skipped_and_counted_or_fail(tmp_path):
  write_text_corpus(tmp_path / "corpus")
  (tmp_path / "corpus" / "latin1.txt").write_bytes("café".encode("latin-1"))
  (tmp_path / "corpus" / "corrupt.jsonl.gz").write_bytes(b"not gzip at all")
  (tmp_path / "corpus" / "lines.jsonl").write_text('{"text": "good line"}\n{"text": broken\n')
  run_prepare(tmp_path / "store", str(tmp_path / "corpus"))
  report = open_store(tmp_path / "store").metadata["sources"]
  assert report["skipped_inputs"] == 3
  assert sum("latin1.txt" in e or "corrupt.jsonl.gz" in e or "lines.jsonl:2" in e
             for e in report["skipped_examples"]) == 3
  assert report["num_documents"] == len(corpus_texts()) + 1  # the good JSONL line is kept
  with pytest.raises(CorpusError, match=r"cannot read .*(latin1.txt|corrupt.jsonl.gz|lines.jsonl:2)"):
    run_prepare(tmp_path / "strict", str(tmp_path / "corpus"), "--on_bad_input", "fail")
  assert not tmp_path.joinpath("strict").exists()


@pytest.mark.slow
def test_bad_input_errors_are_clear(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "a.txt").write_text("")
  with pytest.raises(CorpusError, match="holds no text"):
    run_prepare(tmp_path / "s1", str(tmp_path / "empty"))
  with pytest.raises(CorpusError, match="matches no file"):
    run_prepare(tmp_path / "s2", str(tmp_path / "missing*.txt"))
  (tmp_path / "records.jsonl").write_text('{"body": "text under another name"}\n')
  with pytest.raises(CorpusError, match=r"records.jsonl:1.*no field 'text'.*--text_field"):
    run_prepare(tmp_path / "s3", str(tmp_path / "records.jsonl"))
  pq.write_table(pa.table({"body": ["x"]}), tmp_path / "rows.parquet")
  with pytest.raises(CorpusError, match="no column 'text'"):
    run_prepare(tmp_path / "s4", str(tmp_path / "rows.parquet"))
  assert not any(TEMP_MARKER in p.name for p in tmp_path.iterdir())


def test_reused_tokenizer_and_vocabulary_mismatch(tmp_path, text_store):
  store, corpus, _ = text_store
  with pytest.raises(TokenizerMismatchError, match=f"--vocab_size={VOCAB}"):
    run_prepare(tmp_path / "store", str(corpus), "--tokenizer_model", str(store.tokenizer_path),
                "--vocab_size", "512")
  args = ["--output", str(tmp_path / "store"), "--tokenizer_model", str(store.tokenizer_path),
          str(corpus)]
  prepare.prepare_store(parse_settings(args))
  assert open_store(tmp_path / "store").tokenizer_sha256 == store.tokenizer_sha256


@pytest.mark.slow
def test_failure_before_publishing_leaves_no_store_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
  write_text_corpus(tmp_path / "corpus")
  publish = store_writer.replace_directory

  def fail(*unused):
    raise OSError("disk full")

  monkeypatch.setattr(store_writer, "replace_directory", fail)
  with pytest.raises(OSError, match="disk full"):
    run_prepare(tmp_path / "store", str(tmp_path / "corpus"))
  (leftover,) = tmp_path.glob(f"store{TEMP_MARKER}*")  # kept for the re-run, never trusted
  for path in (leftover, tmp_path / "store"):
    with pytest.raises(StoreError):
      open_store(path)
  monkeypatch.setattr(store_writer, "replace_directory", publish)
  capsys.readouterr()
  run_prepare(tmp_path / "store", str(tmp_path / "corpus"))
  assert "resuming the interrupted preparation" in capsys.readouterr().err
  store = open_store(tmp_path / "store")
  assert store.metadata["preparation"]["units_resumed"] == store.metadata["sources"]["num_units"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "store"]


@pytest.mark.slow
def test_killed_preparation_is_never_trusted_and_a_rerun_completes(tmp_path):
  write_text_corpus(tmp_path / "corpus")
  argv = ["--output", str(tmp_path / "store"), "--vocab_size", str(VOCAB), "--no_progress",
          "--tokenizer_sample_bytes", "200000", str(tmp_path / "corpus")]
  # The process dies the moment it would rename the finished temporary directory into place.
  script = ("import os, signal, sys\n"
            "from data_pipelines import prepare\n"
            "from yanjax.data import store_writer\n"
            "store_writer.replace_directory = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            "prepare.main(sys.argv[1:])\n")
  killed = subprocess.run([sys.executable, "-c", script, *argv], cwd=REPO, capture_output=True)
  assert killed.returncode == -9
  (leftover,) = tmp_path.glob(f"store{TEMP_MARKER}*")
  assert (leftover / "metadata.json").is_file()  # complete, yet untrusted by its name
  for path in (leftover, tmp_path / "store"):
    with pytest.raises(StoreError):
      open_store(path)
  prepare.prepare_store(parse_settings(argv))
  assert open_store(tmp_path / "store").num_documents["train"] > 0


def test_incomplete_metadata_is_never_trusted(tmp_path, text_store):
  store, _, _ = text_store
  copy = tmp_path / "copy"
  shutil.copytree(store.path, copy)
  text = (copy / "metadata.json").read_text()
  (copy / "metadata.json").write_text(text[:len(text) // 2])
  with pytest.raises(StoreError, match="no complete metadata.json"):
    open_store(copy)
  (copy / "metadata.json").unlink()
  with pytest.raises(StoreError, match="no complete metadata.json"):
    open_store(copy)


def test_help_and_cli_error_exit(tmp_path, capsys):
  shown = subprocess.run([sys.executable, "-m", "data_pipelines.prepare", "--help"], cwd=REPO,
                         capture_output=True, text=True)
  assert shown.returncode == 0 and "--output" in shown.stdout and "--on_bad_input" in shown.stdout
  assert prepare_main(["--output", str(tmp_path / "store"), str(tmp_path / "missing/*.txt")]) == 2
  assert "error: input" in capsys.readouterr().err


def test_default_corpus_is_the_standard_library():
  files = sources.stdlib_files()
  assert len(files) > 100 and all(f.url.endswith(".py") for f in files)
  assert not any(sources.STDLIB_EXCLUDED_DIRS.intersection(pathlib.Path(f.url).parts) for f in files)


@pytest.mark.slow
def test_default_preparation(tmp_path):
  prepare.prepare_store(parse_settings(["--output", str(tmp_path / "stdlib"), "--no_progress"]))
  store = open_store(tmp_path / "stdlib")
  assert store.metadata["sources"]["num_files"] == len(sources.stdlib_files())
  assert store.num_tokens["train"] > 1_000_000
