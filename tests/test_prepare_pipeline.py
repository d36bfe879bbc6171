"""The Ray Data preparation pipeline on the session's Ray cluster: splits and dedup by content, Hugging Face
datasets and tokenizer.json, corpora in a bucket, token dtypes, and a store's shards read end to end."""

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
from s3_server import free_port
from test_train import REPO, run_train, tiny_flags
from tokenizer_helpers import byte_level_bpe, word_level

from data_pipelines.prepare import parse_settings
from yanjax.data import sources
from yanjax.data.errors import DataError, TokenizerMismatchError
from yanjax.data.loader import make_loader
from yanjax.data.prepare import prepare_store
from yanjax.data.store import open_store

STDLIB_MODULES = ("textwrap.py", "bisect.py", "colorsys.py", "keyword.py", "queue.py", "sched.py", "shlex.py",
                  "glob.py", "fnmatch.py", "heapq.py", "copy.py", "numbers.py")


def texts() -> list[str]:
  return [(sources.stdlib_root() / name).read_text() for name in STDLIB_MODULES]


def run_prepare(output, *argv: str):
  return prepare_store(parse_settings(["--output", str(output), "--no_progress", "--validation_fraction", "0.3",
                                       *argv]))


def decoded_by_split(store) -> dict[str, list[str]]:
  """split -> the texts of its documents, in stored order."""
  tokenizer = store.tokenizer()
  return {split: [tokenizer.decode(store.split(split).document(i)[1:-1].tolist())
                  for i in range(store.num_documents[split])] for split in ("train", "validation")}


def stored_arrays(store) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """split -> (its tokens, its document offsets), read end to end across its shards."""
  return {split: (store.split(split).tokens.read().result(), store.split(split).doc_offsets)
          for split in ("train", "validation")}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
  path.write_bytes(byte_level_bpe([t[:4000] for t in texts()], ["<|endoftext|>"], vocab_size=600))
  return path


@pytest.mark.slow
def test_split_follows_content_and_dedup_keeps_first_copies(tmp_path, tokenizer_json):
  corpus = texts()
  (tmp_path / "a").mkdir()
  for i, text in enumerate(corpus):
    (tmp_path / "a" / f"{i:02d}.py").write_text(text)
  (tmp_path / "a" / "zz_copy.py").write_text(corpus[3])
  records = [json.dumps({"text": t}) for t in (corpus[0], "a new document", corpus[0])]
  (tmp_path / "a" / "zz_records.jsonl").write_text("\n".join(records) + "\n")
  common = ("--tokenizer_model", str(tokenizer_json), "--input_shard_bytes", "30000")
  run_prepare(tmp_path / "deduped", str(tmp_path / "a"), "--dedup", *common)
  store = open_store(tmp_path / "deduped")
  decoded = decoded_by_split(store)
  assert sorted(decoded["train"] + decoded["validation"]) == sorted(corpus + ["a new document"])
  assert store.metadata["sources"]["duplicates_removed"] == 3
  assert store.metadata["sources"]["num_documents"] == len(corpus) + 4  # read, before dedup
  # Without dedup every copy stays, each in its text's split: no copy of a validation document is trained on.
  run_prepare(tmp_path / "all", str(tmp_path / "a"), *common)
  all_copies = decoded_by_split(open_store(tmp_path / "all"))
  assert len(all_copies["train"] + all_copies["validation"]) == len(corpus) + 4
  assert not set(all_copies["train"]) & set(all_copies["validation"])
  # Moved, renamed and re-sharded files: every text keeps its split.
  (tmp_path / "b" / "deeper").mkdir(parents=True)
  for i, text in enumerate(reversed(corpus)):
    (tmp_path / "b" / "deeper" / f"renamed_{i}.txt").write_text(text)
  run_prepare(tmp_path / "moved", str(tmp_path / "b"), "--tokenizer_model", str(tokenizer_json),
              "--input_shard_bytes", "1000000")
  moved = decoded_by_split(open_store(tmp_path / "moved"))
  for split in ("train", "validation"):
    assert sorted(moved[split]) == sorted(t for t in decoded[split] if t in corpus)


@pytest.mark.slow
def test_hugging_face_dataset_with_a_tokenizer_json_trains_the_loader(tmp_path, tokenizer_json, monkeypatch):
  import datasets  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  corpus = texts() + ["", "short document"]
  datasets.Dataset.from_dict({"content": corpus, "id": list(range(len(corpus)))}).save_to_disk(tmp_path / "saved")
  run_prepare(tmp_path / "store", "--hf_dataset", str(tmp_path / "saved"), "--text_field", "content",
              "--tokenizer_model", str(tokenizer_json), "--input_shard_bytes", "20000")
  store = open_store(tmp_path / "store")
  assert store.metadata["tokenizer"]["kind"] == "huggingface" and store.tokenizer_path.name == "tokenizer.json"
  assert store.tokenizer_bytes() == tokenizer_json.read_bytes()
  assert store.metadata["sources"]["num_units"] > 1 and store.metadata["sources"]["empty_documents"] == 1
  decoded = decoded_by_split(store)
  assert sorted(decoded["train"] + decoded["validation"]) == sorted(t for t in corpus if t)
  loader = make_loader([store], seq_len=64, global_batch=4, expected_vocab_size=store.vocab_size,
                       expected_tokenizer_sha256=store.tokenizer_sha256)
  batch = loader.batch(0)
  assert batch["inputs"].shape == (4, 64) and batch["inputs"].max() < store.vocab_size
  with pytest.raises(DataError, match="no column 'text'"):
    run_prepare(tmp_path / "other", "--hf_dataset", str(tmp_path / "saved"), "--tokenizer_model",
                str(tokenizer_json))


@pytest.mark.slow
def test_a_run_trains_samples_and_generates_with_a_tokenizer_json_and_refuses_another_tokenizer(tmp_path,
                                                                                                tokenizer_json):
  common = ("--validation_fraction", "0.2", "--input_shard_bytes", "30000")
  run_prepare(tmp_path / "hf", *[str(sources.stdlib_root() / m) for m in STDLIB_MODULES], "--tokenizer_model",
              str(tokenizer_json), *common)
  vocab = open_store(tmp_path / "hf").vocab_size
  flags = tiny_flags(tmp_path / "hf", steps=6) + [f"--config.model.vocab_size={vocab}",
                                                  "--config.train.sample_tokens=8"]
  code, out, err = run_train(tmp_path / "run", flags)
  assert code == 0, err
  assert (tmp_path / "run" / "tokenizer.json").read_bytes() == tokenizer_json.read_bytes()
  assert (tmp_path / "run" / "sample.txt").read_text().startswith("def")  # the config's prompt, decoded back
  (tmp_path / "prompts.txt").write_text("import os\n")
  generated = subprocess.run([sys.executable, "-m", "yanjax.main.generate", "--workdir", str(tmp_path / "run"),
                              "--prompts_file", str(tmp_path / "prompts.txt"), "--max_new_tokens", "4"], cwd=REPO,
                             capture_output=True, text=True)
  assert generated.returncode == 0, generated.stderr
  (line,) = generated.stdout.splitlines()
  assert json.loads(line)["prompt"] == "import os" and len(json.loads(line)["tokens"]) <= 4
  # The same files with a trained sentencepiece model of the same size: resuming on it is refused.
  run_prepare(tmp_path / "spm", *[str(sources.stdlib_root() / m) for m in STDLIB_MODULES], "--vocab_size", str(vocab),
              *common)
  code, _, err = run_train(tmp_path / "run", tiny_flags(tmp_path / "spm", steps=8) +
                           [f"--config.model.vocab_size={vocab}"])
  assert code == 2 and "trained on other data" in err and "tokenizer" in err


@pytest.mark.slow
def test_a_corpus_in_a_bucket_prepares_the_same_store_as_local_files(tmp_path, s3_bucket, tokenizer_json):
  from etils import epath  # pylint: disable=import-outside-toplevel
  corpus = texts()
  local = tmp_path / "corpus"
  local.mkdir()
  with gzip.open(local / "a.jsonl.gz", "wt", encoding="utf-8") as f:
    f.write("\n".join(json.dumps({"text": t}) for t in corpus[:6]) + "\n")
  pq.write_table(pa.table({"text": corpus[6:]}), local / "b.parquet")
  for path in sorted(local.iterdir()):
    epath.Path(f"{s3_bucket}/corpus/{path.name}").write_bytes(path.read_bytes())
  common = ("--tokenizer_model", str(tokenizer_json), "--input_shard_bytes", "20000")
  run_prepare(tmp_path / "local_store", str(local), *common)
  run_prepare(f"{s3_bucket}/stores/web", f"{s3_bucket}/corpus/*", *common)
  remote, expected = open_store(f"{s3_bucket}/stores/web"), open_store(tmp_path / "local_store")
  for split, (tokens, offsets) in stored_arrays(expected).items():
    np.testing.assert_array_equal(stored_arrays(remote)[split][0], tokens)
    np.testing.assert_array_equal(stored_arrays(remote)[split][1], offsets)
  assert remote.metadata["sources"]["num_files"] == 2


def test_token_dtype_and_tokenizer_file_refusals(tmp_path):
  (tmp_path / "corpus.txt").write_text(" ".join(f"w{i}" for i in range(0, 70000, 7)) + " w69999\n")
  (tmp_path / "tokenizer.json").write_bytes(word_level(70000))
  with pytest.raises(DataError, match=r"--token_dtype=uint16: a vocabulary of 70003 ids does not fit uint16"):
    run_prepare(tmp_path / "s16", str(tmp_path / "corpus.txt"), "--tokenizer_model", str(tmp_path / "tokenizer.json"),
                "--token_dtype", "uint16")
  run_prepare(tmp_path / "s32", str(tmp_path / "corpus.txt"), "--tokenizer_model", str(tmp_path / "tokenizer.json"),
              "--validation_fraction", "0")
  store = open_store(tmp_path / "s32")
  assert store.metadata["token_dtype"] == "uint32" and int(store.split("train").document(0).max()) == 70002
  (tmp_path / "not_a_tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
  with pytest.raises(TokenizerMismatchError, match="not_a_tokenizer.json"):
    run_prepare(tmp_path / "bad", str(tmp_path / "corpus.txt"), "--tokenizer_model",
                str(tmp_path / "not_a_tokenizer.json"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "not_a_tokenizer.json", "s32", "tokenizer.json"]


def test_an_unreachable_ray_cluster_is_one_line_and_leaves_nothing(tmp_path):
  (tmp_path / "corpus.txt").write_text("some text\n")
  with pytest.raises(DataError, match=r"--ray_address 127.0.0.1:\d+: cannot join the Ray cluster") as error:
    run_prepare(tmp_path / "store", str(tmp_path / "corpus.txt"), "--ray_address", f"127.0.0.1:{free_port()}")
  assert "\n" not in str(error.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_a_store_of_the_previous_format_is_refused(tmp_path, small_store):
  copy = tmp_path / "old"
  shutil.copytree(small_store, copy)
  metadata = json.loads((copy / "metadata.json").read_text())
  (copy / "metadata.json").write_text(json.dumps({**metadata, "format_version": 1}))
  with pytest.raises(DataError, match="version 1, this library reads 'yanjax-token-store' version 2"):
    open_store(copy)
