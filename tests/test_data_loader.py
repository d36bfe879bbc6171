"""Loader tests on small synthetic stores: packing against a slow reference, shares, resume, mixing."""

import itertools
import pathlib

import numpy as np
import pytest
from etils import epath

from yanjax.data import shard_writer, sources, store_writer, tokenizer
from yanjax.data import store as store_format
from yanjax.data.errors import DataError, SequenceLengthError, TokenizerMismatchError
from yanjax.data.loader import make_loader
from yanjax.data.packing import DocumentRows, PackedSequences
from yanjax.data.store import open_store

VOCAB = 400
BOS, EOS = 1, 2
SHARDS = 3  # shards per split: the loader reads them end to end
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def _train_tokenizer(vocab_size: int) -> bytes:
  texts = (sources.stdlib_root() / name for name in ("textwrap.py", "bisect.py", "json/decoder.py"))
  sentences = tokenizer.sample_sentences((p.read_text() for p in texts), 100_000)
  return tokenizer.train_sentencepiece(sentences, vocab_size, "bpe", num_threads=1)


@pytest.fixture(scope="module")
def tokenizer_model() -> bytes:
  return _train_tokenizer(VOCAB)


def random_documents(rng: np.random.Generator, count: int, low: int, high: int,
                     total: int | None = None) -> list[np.ndarray]:
  """`count` documents framed by bos/eos with ids in [low, high); `total` tokens when given."""
  lengths = rng.integers(3, 40, size=count)
  if total is not None:
    lengths[-1] = total - lengths[:-1].sum()
    assert lengths[-1] >= 3, "fewer documents needed for this total"
  return [np.concatenate([[BOS], rng.integers(low, high, size=n - 2), [EOS]]) for n in lengths]


def write_store(path: pathlib.Path, model: bytes, train: list[np.ndarray],
                validation: list[np.ndarray] = ()) -> pathlib.Path:
  """A store of these documents, each split cut into SHARDS shards (as input shards cut them)."""
  processor = tokenizer.from_bytes(model, "the test tokenizer")
  dtype = store_format.token_dtype(processor.vocab_size)
  temp = store_writer.temporary_directory(epath.Path(path), "synthetic")
  temp.mkdir(parents=True)
  (temp / processor.file_name).write_bytes(model)
  splits = {}
  for name, documents in (("train", train), ("validation", validation)):
    shards = []
    for index, part in enumerate(np.array_split(np.arange(len(documents)), SHARDS)):
      writer = shard_writer.ShardWriter(temp / name / f"{index:06d}", dtype)
      writer.add([documents[i] for i in part])
      shards += [entry for entry in [writer.finish()] if entry["num_documents"]]
    splits[name] = {"num_tokens": sum(s["num_tokens"] for s in shards), "shards": shards,
                    "num_documents": sum(s["num_documents"] for s in shards)}
  metadata = {"format": store_format.FORMAT_NAME, "format_version": store_format.FORMAT_VERSION,
              "fingerprint": "synthetic", "tokenizer": processor.metadata(), "token_dtype": dtype.name,
              "splits": splits}
  store_writer.publish(temp, epath.Path(path), metadata, overwrite=False)
  return path


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, tokenizer_model) -> pathlib.Path:
  """A train split of exactly 40 * 16 + 1 tokens: 40 windows of T=16 per epoch, no tail."""
  rng = np.random.default_rng(0)
  return write_store(tmp_path_factory.mktemp("store") / "synthetic", tokenizer_model,
                     random_documents(rng, 25, 3, VOCAB, total=40 * 16 + 1),
                     random_documents(rng, 8, 3, VOCAB))


def reference_packed_row(documents: list[np.ndarray], source: PackedSequences, index: int,
                         seq_len: int) -> dict[str, np.ndarray]:
  """Row `index` built token by token from the epoch's shuffles alone."""
  layout = source.layout(index // source.rows_per_epoch)
  stream = [(doc, pos, int(token)) for doc in layout.document_order
            for pos, token in enumerate(documents[doc])]
  first = int(layout.window_order[index % source.rows_per_epoch]) * seq_len
  window = stream[first:first + seq_len + 1]
  segment, row = 1, {key: [] for key in KEYS}
  for i in range(seq_len):
    (doc, pos, token), (next_doc, _, next_token) = window[i], window[i + 1]
    if i > 0 and doc != window[i - 1][0]:
      segment += 1
    row["inputs"].append(token)
    row["targets"].append(next_token)
    row["segment_ids"].append(segment)
    row["positions"].append(pos if segment > 1 else pos - window[0][1])
    row["loss_mask"].append(float(doc == next_doc))
  return {key: np.array(value) for key, value in row.items()}


def test_batch_keys_shapes_and_dtypes(store_path):
  batch = make_loader([store_path], seq_len=16, global_batch=8, process_count=2).batch(3)
  assert sorted(batch) == sorted(KEYS)
  for key in KEYS:
    assert batch[key].shape == (4, 16), key
    assert batch[key].dtype == (np.float32 if key == "loss_mask" else np.int32), key


def test_packing_matches_slow_reference(store_path):
  split = open_store(store_path).split("train")
  documents = [split.document(i) for i in range(split.num_documents)]
  loader = make_loader([store_path], seq_len=16, global_batch=8, seed=3)
  source = PackedSequences(split.doc_offsets, split.reader(0), 16, seed=3, stream=0)
  for step in (0, 4, 5, 9):  # epoch 0, the epoch boundary (rows 40..47), and epoch 1
    batch = loader.batch(step)
    for row in range(8):
      expected = reference_packed_row(documents, source, step * 8 + row, 16)
      for key in KEYS:
        np.testing.assert_array_equal(batch[key][row], expected[key], err_msg=f"{step=} {row=} {key}")
    starts = (batch["positions"] == 0) & (batch["segment_ids"] > 1)
    assert (batch["inputs"][starts] == BOS).all()  # a later segment begins with its document's bos
    assert (batch["targets"][batch["loss_mask"] == 0] == BOS).all()  # masked targets start a document


def test_epochs_reshuffle_and_seeds_differ(store_path):
  loader = make_loader([store_path], seq_len=16, global_batch=8, seed=0)
  epoch0 = np.concatenate([loader.batch(s)["inputs"] for s in range(5)])
  epoch1 = np.concatenate([loader.batch(s)["inputs"] for s in range(5, 10)])
  assert not np.array_equal(epoch0, epoch1)
  # With no tail left out, every epoch feeds each token (but the stream's final eos) once as an input.
  np.testing.assert_array_equal(np.sort(epoch0, axis=None), np.sort(epoch1, axis=None))
  other_seed = make_loader([store_path], seq_len=16, global_batch=8, seed=1).batch(0)["inputs"]
  assert not np.array_equal(other_seed, epoch0[:8])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shares_are_disjoint_and_complete(store_path, process_count):
  single = make_loader([store_path], seq_len=16, global_batch=8)
  shards = [make_loader([store_path], seq_len=16, global_batch=8, process_index=p,
                        process_count=process_count) for p in range(process_count)]
  for step in range(7):  # crosses the epoch boundary at step 5
    whole = single.batch(step)
    for key in KEYS:
      np.testing.assert_array_equal(np.concatenate([s.batch(step)[key] for s in shards]), whole[key])
  # One epoch (steps 0..4) of all shares reads every token once; only the stream's final eos is no input.
  tokens = open_store(store_path).split("train").tokens.read().result().astype(np.int64)
  inputs = np.concatenate([s.batch(step)["inputs"].ravel() for s in shards for step in range(5)])
  missing = np.bincount(tokens, minlength=VOCAB) - np.bincount(inputs, minlength=VOCAB)
  assert missing[EOS] == 1 and missing.sum() == 1 and missing.min() == 0


def test_resume_mid_epoch_and_across_epoch_boundary(store_path):
  running = make_loader([store_path], seq_len=16, global_batch=8, seed=7)
  expected = [running.batch(step) for step in range(10)]
  for start in (2, 4):  # mid-epoch; and a start whose next batches cross into epoch 1
    restarted = make_loader([store_path], seq_len=16, global_batch=8, seed=7)
    resumed = list(itertools.islice(iter(restarted.iterate(start)), 3))
    for offset, batch in enumerate(resumed):
      for key in KEYS:
        np.testing.assert_array_equal(batch[key], expected[start + offset][key])


def test_unpacked_rows_are_padded_document_prefixes(store_path):
  split = open_store(store_path).split("train")
  loader = make_loader([store_path], seq_len=24, global_batch=6, packing=False, seed=2)
  source = DocumentRows(split.doc_offsets, split.reader(0), 24, seed=2, stream=0)
  for step in (0, 5):  # epoch 0 and epoch 1 (25 documents per epoch)
    batch = loader.batch(step)
    for row in range(6):
      index = step * 6 + row
      document = split.document(source.layout(index // 25)[index % 25])[:25]
      n = len(document) - 1  # inputs with a target inside the row
      np.testing.assert_array_equal(batch["inputs"][row, :n], document[:-1])
      np.testing.assert_array_equal(batch["targets"][row, :n], document[1:])
      np.testing.assert_array_equal(batch["positions"][row, :n], np.arange(n))
      assert (batch["segment_ids"][row, :n + 1] == 1).all() and (batch["segment_ids"][row, n + 1:] == 0).all()
      assert (batch["loss_mask"][row, :n] == 1).all() and (batch["loss_mask"][row, n:] == 0).all()
      assert (batch["inputs"][row, n + 1:] == 0).all() and (batch["positions"][row, n + 1:] == 0).all()


def test_in_memory_and_tensorstore_reads_agree(store_path):
  for packing in (True, False):
    in_memory = make_loader([store_path], seq_len=16, global_batch=8, packing=packing)
    streamed = make_loader([store_path], seq_len=16, global_batch=8, packing=packing,
                           max_in_memory_bytes=0)
    for step in (0, 6):
      for key in KEYS:
        np.testing.assert_array_equal(in_memory.batch(step)[key], streamed.batch(step)[key])


def test_mixing_follows_weights(tmp_path, store_path, tokenizer_model):
  rng = np.random.default_rng(1)
  high = write_store(tmp_path / "high", tokenizer_model, random_documents(rng, 30, 200, VOCAB))
  low = write_store(tmp_path / "low", tokenizer_model, random_documents(rng, 30, 3, 200))
  loader = make_loader([low, high], weights=[1, 3], seq_len=8, global_batch=16)
  rows = np.concatenate([loader.batch(step)["inputs"] for step in range(25)])
  from_high = (rows >= 200).any(axis=1)
  from_low = ((rows > EOS) & (rows < 200)).any(axis=1)
  assert (from_high != from_low).all()  # every row comes from exactly one store
  assert abs(from_high.mean() - 0.75) < 0.03


def test_mixing_stores_of_different_tokenizers_fails(tmp_path, store_path):
  other = write_store(tmp_path / "other", _train_tokenizer(VOCAB + 10),
                      random_documents(np.random.default_rng(2), 30, 3, VOCAB))
  with pytest.raises(TokenizerMismatchError, match="different tokenizers"):
    make_loader([store_path, other], seq_len=8, global_batch=4)


def test_clear_errors(tmp_path, store_path, tokenizer_model):
  store = open_store(store_path)
  with pytest.raises(TokenizerMismatchError, match=f"vocab_size to {VOCAB}"):
    make_loader([store_path], seq_len=16, global_batch=8, expected_vocab_size=VOCAB + 1)
  with pytest.raises(TokenizerMismatchError, match="--tokenizer_model"):
    make_loader([store_path], seq_len=16, global_batch=8, expected_tokenizer_sha256="0" * 64)
  make_loader([store_path], seq_len=16, global_batch=8, expected_vocab_size=VOCAB,
              expected_tokenizer_sha256=store.tokenizer_sha256)  # matching expectations pass
  with pytest.raises(SequenceLengthError, match="lower seq_len"):
    make_loader([store_path], seq_len=16, global_batch=41)  # 40 windows per epoch
  with pytest.raises(SequenceLengthError, match="longest"):
    make_loader([store_path], seq_len=200, global_batch=4, packing=False)
  with pytest.raises(DataError, match="divisible"):
    make_loader([store_path], seq_len=16, global_batch=8, process_count=3)
  with pytest.raises(DataError, match="one positive number per store"):
    make_loader([store_path], weights=[1, 2], seq_len=16, global_batch=8)
  no_validation = write_store(tmp_path / "no_validation", tokenizer_model,
                              random_documents(np.random.default_rng(3), 20, 3, VOCAB))
  with pytest.raises(SequenceLengthError, match="0 documents"):
    make_loader([no_validation], split="validation", seq_len=16, global_batch=2)
