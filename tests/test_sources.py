"""Reading corpora (yanjax/data/sources.py, hf_datasets.py): plain text by document, paragraph and line, JSONL(.gz),
Parquet, Hugging Face datasets, listing local and S3 inputs; every bad input skipped and counted, or refused, with
the path, line or row named; reading streams."""

import gzip
import json
import pickle
import re
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from etils import epath

from yanjax.core.config import ConfigError
from yanjax.data import hf_datasets, sources
from yanjax.data.documents import ReadReport
from yanjax.data.errors import CorpusError
from yanjax.data.hf_datasets import DatasetRows
from yanjax.data.sources import InputFile

PARAGRAPHS = "first line\nsecond line\n\n  \nthird line\r\n\n\n\nlast, no newline"


def read(part, text_field="text", sample_by="document", policy="skip"):
  """(documents as (where, text) pairs, report) of one input."""
  report = ReadReport(policy)
  if isinstance(part, str):
    (part,) = sources.list_inputs([part])
  return [(d.where, d.text) for d in sources.read_documents(part, text_field, sample_by, report)], report


def write_parquet(path, **columns):
  pq.write_table(pa.table(columns), path)
  return str(path)


def test_plain_text_by_document_paragraph_and_line(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text(PARAGRAPHS)
  p = str(path)
  docs, report = read(p)
  assert docs == [(p, PARAGRAPHS)] and report.documents == 1
  docs, report = read(p, sample_by="paragraph")
  assert docs == [(f"{p}:1", "first line\nsecond line"), (f"{p}:5", "third line"), (f"{p}:9", "last, no newline")]
  assert (report.documents, report.empty_documents, report.skipped) == (3, 0, 0)
  docs, report = read(p, sample_by="line")
  assert docs == [(f"{p}:1", "first line"), (f"{p}:2", "second line"), (f"{p}:5", "third line"),
                  (f"{p}:9", "last, no newline")]
  assert (report.documents, report.empty_documents) == (4, 5)  # blank and whitespace-only lines
  gz = tmp_path / "a.txt.gz"
  gz.write_bytes(gzip.compress(PARAGRAPHS.encode()))
  assert [t for _, t in read(str(gz), sample_by="paragraph")[0]] == [t for _, t in read(p, sample_by="paragraph")[0]]
  with pytest.raises(ValueError, match="sample_by='sentence'"):
    read(p, sample_by="sentence")


def test_documents_larger_than_the_limit_are_bad_input(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 16)
  path = tmp_path / "big.txt"
  path.write_text("short\n" + "x" * 17 + "\n" + "y" * 16 + "\n\nsixteen bytes ok\nand more\n\nend")
  p = str(path)
  docs, report = read(p)
  assert docs == [] and report.skipped == 1 and "--text_sample_by=paragraph or line" in report.skipped_examples[0]
  with pytest.raises(CorpusError, match=f"cannot read {p}: .*larger than 16 bytes.*--text_sample_by=paragraph"):
    read(p, policy="fail")
  docs, report = read(p, sample_by="line")  # the 17-byte line is skipped; a 16-byte line is not
  assert [w for w, _ in docs] == [f"{p}:1", f"{p}:3", f"{p}:5", f"{p}:6", f"{p}:8"]
  assert report.skipped == 1 and report.skipped_examples[0].startswith(f"{p}:2: ")
  docs, report = read(p, sample_by="paragraph")  # paragraphs of 40 and 25 bytes; "end" fits
  assert docs == [(f"{p}:8", "end")] and report.skipped == 2
  assert [e.split(": ")[0] for e in report.skipped_examples] == [f"{p}:2", f"{p}:5"]
  assert "--text_sample_by=line" in report.skipped_examples[1]


def test_non_utf8_text(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes(b"good\nbad \xe9t\xe9\nstill in that paragraph\n\nnext\n")
  p = str(path)
  docs, report = read(p)
  assert docs == [] and report.skipped == 1 and report.skipped_examples[0].startswith(f"{p}: UnicodeDecodeError")
  docs, report = read(p, sample_by="line")
  assert docs == [(f"{p}:1", "good"), (f"{p}:3", "still in that paragraph"), (f"{p}:5", "next")]
  assert report.skipped == 1 and report.skipped_examples[0].startswith(f"{p}:2: UnicodeDecodeError")
  docs, report = read(p, sample_by="paragraph")  # the paragraph holding the bad line is left out whole
  assert docs == [(f"{p}:5", "next")] and report.skipped_examples[0].startswith(f"{p}:2: ")
  with pytest.raises(CorpusError, match=f"cannot read {p}:2: UnicodeDecodeError.*--on_bad_input=skip") as error:
    read(p, sample_by="line", policy="fail")
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_jsonl(tmp_path, suffix):
  lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": None}), json.dumps({"text": "  "}),
           "{not json", json.dumps({"text": "two"})]
  data = "\n".join(lines).encode() + b"\n" + b'{"text": "caf\xe9"}\n' + json.dumps({"text": "three"}).encode()
  path = tmp_path / f"c{suffix}"
  path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
  p = str(path)
  assert sources.list_inputs([p])[0].kind == "jsonl"
  docs, report = read(p)
  assert docs == [(f"{p}:1", "one"), (f"{p}:6", "two"), (f"{p}:8", "three")]
  assert (report.documents, report.empty_documents, report.skipped) == (3, 2, 2)
  assert [e.split(": ")[0] for e in report.skipped_examples] == [f"{p}:5", f"{p}:7"]
  with pytest.raises(CorpusError, match=f"cannot read {p}:5: JSONDecodeError"):
    read(p, policy="fail")


def test_jsonl_without_the_text_field_is_refused(tmp_path):
  path = tmp_path / "c.jsonl"
  for records, message in (([{"text": "a"}, {"body": "b", "id": 2}], r"c.jsonl:2: record has no field 'text' "
                            r"\(it has \['body', 'id'\]\); pass --text_field="),
                           ([{"text": 3}], "c.jsonl:1: field 'text' holds a int, not text; pass --text_field="),
                           ([["a"]], r"c.jsonl:1: record has no field 'text' \(it has list\)")):
    path.write_text("\n".join(json.dumps(r) for r in records))
    for policy in sources.BAD_INPUT_POLICIES:
      with pytest.raises(CorpusError, match=message):
        read(str(path), policy=policy)


def test_truncated_gzip_is_bad_input(tmp_path):
  data = gzip.compress("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20000)).encode())
  path = tmp_path / "cut.jsonl.gz"
  path.write_bytes(data[:len(data) // 2])
  p = str(path)
  docs, report = read(p)
  assert 0 < len(docs) < 20000 and report.skipped == 1  # what came before the cut, and the rest counted
  assert report.skipped_examples[0].startswith(f"{p}: EOFError")
  with pytest.raises(CorpusError, match=f"cannot read {p}: EOFError"):
    read(p, policy="fail")


def test_parquet(tmp_path):
  texts = ["a", None, "", "b", "c"] * 500  # 2500 rows: three batches
  p = write_parquet(tmp_path / "t.parquet", text=texts, n=list(range(2500)))
  assert sources.list_inputs([p])[0].kind == "parquet"
  docs, report = read(p)
  assert docs[:4] == [(f"{p} row 0", "a"), (f"{p} row 3", "b"), (f"{p} row 4", "c"), (f"{p} row 5", "a")]
  assert docs[-1] == (f"{p} row 2499", "c") and (report.documents, report.empty_documents) == (1500, 1000)
  for column, message in (("body", r"no column 'body' \(it has \['text', 'n'\]\); pass --text_field="),
                          ("n", "column 'n' has type int64, not text; pass --text_field=")):
    for policy in sources.BAD_INPUT_POLICIES:
      with pytest.raises(CorpusError, match=f"{p}: {message}"):
        read(p, text_field=column, policy=policy)


def test_bad_parquet_files_and_values(tmp_path):
  good = write_parquet(tmp_path / "good.parquet", text=["x"] * 100)
  truncated, not_parquet = tmp_path / "cut.parquet", tmp_path / "text.parquet"
  truncated.write_bytes(open(good, "rb").read()[:-30])
  not_parquet.write_text("just text")
  for path in (truncated, not_parquet):
    docs, report = read(str(path))
    assert docs == [] and report.skipped == 1 and report.skipped_examples[0].startswith(f"{path}: ArrowInvalid")
    with pytest.raises(CorpusError, match=f"cannot read {path}: ArrowInvalid"):
      read(str(path), policy="fail")
  latin1 = pa.array([b"ok", b"caf\xe9", None, b"fine"], pa.binary()).view(pa.string())  # Parquet checks no UTF-8
  p = write_parquet(tmp_path / "latin1.parquet", text=latin1)
  docs, report = read(p)
  assert docs == [(f"{p} row 0", "ok"), (f"{p} row 3", "fine")] and report.empty_documents == 2
  assert report.skipped == 1 and report.skipped_examples[0].startswith(f"{p} row 1: UnicodeDecodeError")
  with pytest.raises(CorpusError, match=f"cannot read {p} row 1: UnicodeDecodeError"):
    read(p, policy="fail")


def test_unreadable_local_file_is_bad_input(tmp_path):
  (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere")
  (part,) = sources.list_inputs([str(tmp_path / "gone.txt")])
  assert part.size == -1
  docs, report = read(part)
  assert docs == [] and report.skipped_examples[0].startswith(f"{part.url}: FileNotFoundError")


def test_report_merges_and_pickles():
  total, parts = ReadReport("skip"), []
  for i in range(3):
    part = ReadReport("skip", documents=i, empty_documents=1)
    for j in range(15):
      part.bad_input(f"f{i}:{j}", ValueError("x"))
    parts.append(pickle.loads(pickle.dumps(part)))
  for part in parts:
    total.merge(part)
  assert (total.documents, total.empty_documents, total.skipped) == (3, 3, 45)
  assert len(total.skipped_examples) == 20 and total.skipped_examples[15].startswith("f1:0: ")


def test_list_local_inputs(tmp_path):
  for name in ("b/2.txt", "b/1.jsonl", "b/.hidden/x.txt", "b/.x.txt", "b/sub/3.parquet", "a.txt"):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("x")
  files = sources.list_inputs([str(tmp_path / "b"), str(tmp_path / "*.txt"), str(tmp_path / "b/2.txt")])
  assert [f.url for f in files] == [str(tmp_path / n) for n in ("b/1.jsonl", "b/2.txt", "b/sub/3.parquet", "a.txt")]
  assert [f.kind for f in files] == ["jsonl", "text", "parquet", "text"]
  stat = (tmp_path / "a.txt").stat()
  assert files[-1] == InputFile(str(tmp_path / "a.txt"), stat.st_size, str(stat.st_mtime_ns))
  assert [f.url for f in sources.list_inputs([str(tmp_path / "b/*.txt")])] == [str(tmp_path / "b/2.txt")]
  for spec in (str(tmp_path / "none"), str(tmp_path / "*.md")):
    with pytest.raises(CorpusError, match=re.escape(f"input '{spec}' matches no file; check the path or glob")):
      sources.list_inputs([str(tmp_path / "a.txt"), spec])
  with pytest.raises(ConfigError, match="unknown storage scheme gcs://"):
    sources.list_inputs(["gcs://bucket/x"])
  assert sources.stdlib_files()[0].url.endswith(".py")


def test_s3_inputs(s3_bucket):
  objects = {"corpus/a.txt": b"one\n\ntwo\n", "corpus/b/c.jsonl.gz": gzip.compress(b'{"text": "three"}\n'),
             "corpus/.hidden.txt": b"hidden", "corpus/b/.cache/d.txt": b"hidden", "corpusx/e.txt": b"not under",
             "other/f.txt": b"four"}
  for key, data in objects.items():
    epath.Path(f"{s3_bucket}/{key}").write_bytes(data)
  parquet = pa.BufferOutputStream()
  pq.write_table(pa.table({"text": ["five", None]}), parquet)
  epath.Path(f"{s3_bucket}/other/g.parquet").write_bytes(parquet.getvalue().to_pybytes())

  files = sources.list_inputs([f"{s3_bucket}/corpus", f"{s3_bucket}/**/*.parquet", f"{s3_bucket}/other/f.txt",
                               f"{s3_bucket}/corpus/a.txt"])
  assert [f.url for f in files] == [f"{s3_bucket}/{k}" for k in ("corpus/a.txt", "corpus/b/c.jsonl.gz",
                                                                   "other/g.parquet", "other/f.txt")]
  assert files[0].size == 9 and files[0].version.strip('"')  # the ETag
  assert [f.url for f in sources.list_inputs([f"{s3_bucket}/*/*.txt"])] == [
      f"{s3_bucket}/corpus/a.txt", f"{s3_bucket}/corpusx/e.txt", f"{s3_bucket}/other/f.txt"]
  report, texts = ReadReport("fail"), []
  for part in files:
    texts += [(d.where, d.text) for d in sources.read_documents(part, "text", "paragraph", report)]
  a, c, g, f = (p.url for p in files)
  assert texts == [(f"{a}:1", "one"), (f"{a}:3", "two"), (f"{c}:1", "three"), (f"{g} row 0", "five"),
                   (f"{f}:1", "four")]
  assert (report.documents, report.empty_documents) == (5, 1)
  with pytest.raises(CorpusError, match=f"input '{s3_bucket}/nothing' matches no file"):
    sources.list_inputs([f"{s3_bucket}/nothing"])
  with pytest.raises(CorpusError, match=f"input '{s3_bucket}/nothing/\\*' matches no file"):
    sources.list_inputs([f"{s3_bucket}/nothing/*"])
  assert [f.url for f in sources.list_inputs([s3_bucket])][:2] == [a, c]  # the whole bucket
  epath.Path(a).unlink()  # changed since it was listed: an error, not a skipped input
  with pytest.raises(CorpusError, match=f"cannot read {a}: .*check the bucket, the credentials and the network"):
    list(sources.read_documents(files[0], "text", "line", ReadReport("skip")))


def test_missing_bucket_is_one_clear_line(s3_endpoint):
  for url in ("s3://yanjax-no-such-bucket/corpus/", "s3://yanjax-no-such-bucket", "s3://yanjax-no-such-bucket/*.txt"):
    with pytest.raises(ConfigError, match="bucket 'yanjax-no-such-bucket' does not exist") as error:
      sources.list_inputs([url])
    assert str(error.value).startswith(f"input {url}: ") and "\n" not in str(error.value)


def test_reading_streams(tmp_path):
  path = tmp_path / "big.txt"
  line = b"a line of a large corpus, read one line at a time\n"
  with open(path, "wb") as f:
    for _ in range(50):
      f.write(line * ((1 << 20) // len(line)))
  (part,) = sources.list_inputs([str(path)])
  assert part.size > 48 << 20
  tracemalloc.start()
  try:
    documents = sources.read_documents(part, "text", "line", ReadReport("skip"))
    assert next(documents).text == line.decode().strip()
    _, peak = tracemalloc.get_traced_memory()
    documents.close()
  finally:
    tracemalloc.stop()
  assert peak < 4 << 20, peak


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
  """`datasets` with no network and its caches under tmp_path."""
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  import datasets  # after the variables: it reads them when first imported
  import huggingface_hub.constants
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  datasets.disable_progress_bars()
  hf_datasets.load.cache_clear()
  yield datasets
  hf_datasets.load.cache_clear()


def read_rows(dataset, start, stop, split="train", config=None, **kwargs):
  return read(DatasetRows(dataset, config, split, start, stop), **kwargs)


def test_hf_saved_dataset_and_dataset_dict(hf_offline, tmp_path):
  texts = [f"doc {i}" if i % 5 else None for i in range(2100)]
  one = hf_offline.Dataset.from_dict({"text": texts, "n": list(range(2100))})
  one.save_to_disk(str(tmp_path / "one"))
  hf_offline.DatasetDict({"train": one, "validation": one.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
  d = str(tmp_path / "one")
  docs, report = read_rows(d, 0, 2100)
  assert docs[:2] == [(f"{d}[train] row 1", "doc 1"), (f"{d}[train] row 2", "doc 2")]
  assert (report.documents, report.empty_documents) == (1680, 420)
  docs, report = read_rows(d, 1020, 1030)  # across a batch boundary
  assert [w for w, _ in docs] == [f"{d}[train] row {i}" for i in range(1021, 1030) if i % 5]
  assert sum(len(read_rows(d, s, s + 700)[0]) for s in range(0, 2100, 700)) == 1680
  rows, size, version = hf_datasets.describe(d, None, "train")
  assert rows == 2100 and size > 0 and version
  dd = str(tmp_path / "dd")
  docs, _ = read_rows(dd, 0, 10, split="validation")
  assert docs == [(f"{dd}[validation] row 1", "doc 1"), (f"{dd}[validation] row 2", "doc 2")]
  with pytest.raises(CorpusError, match=r"dd has no split 'test' \(it has \['train', 'validation'\]\)"):
    read_rows(dd, 0, 10, split="test")

  hf_offline.Dataset.from_dict({"text": ["changed"]}).save_to_disk(d)
  hf_datasets.load.cache_clear()  # as a new worker process would
  assert hf_datasets.describe(d, None, "train")[2] != version


def test_hf_parquet_files_and_bad_columns(hf_offline, tmp_path):
  for i in range(2):
    write_parquet(tmp_path / f"part-{i}.parquet", text=[f"file {i} row {j}" for j in range(3)], n=[1, 2, 3])
  pattern = str(tmp_path / "part-*.parquet")
  docs, report = read_rows(pattern, 2, 5)
  assert docs == [(f"{pattern}[train] row 2", "file 0 row 2"), (f"{pattern}[train] row 3", "file 1 row 0"),
                  (f"{pattern}[train] row 4", "file 1 row 1")]
  assert hf_datasets.describe(pattern, None, "train")[0] == 6
  for column, message in (("body", r"no column 'body' \(it has \['text', 'n'\]\)"),
                          ("n", "column 'n' has type int64, not text")):
    with pytest.raises(CorpusError, match=f"{re.escape(pattern)}\\[train\\]: {message}; pass --text_field="):
      read_rows(pattern, 0, 6, text_field=column)
  hf_datasets.load(pattern, None, "train").save_to_disk(str(tmp_path / "saved"))  # it records its split
  with pytest.raises(CorpusError, match="saved holds the split 'train', not 'test'; pass --hf_split=train"):
    read_rows(str(tmp_path / "saved"), 0, 1, split="test")
  with pytest.raises(CorpusError, match="cannot load the Hugging Face dataset .*missing-\\*.parquet.*check the path"):
    read_rows(str(tmp_path / "missing-*.parquet"), 0, 1)


def test_hf_hub_name_offline_is_one_clear_line(hf_offline):
  with pytest.raises(CorpusError, match="cannot load the Hugging Face dataset yanjax-test/none\\[train\\]: "
                                        ".*a hub name needs network access.*save_to_disk") as error:
    hf_datasets.describe("yanjax-test/none", None, "train")
  assert "\n" not in str(error.value)
