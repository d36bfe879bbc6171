"""Metric writers: metrics.jsonl resumes with each step once; W&B's offline run holds what was logged."""

import json
import pathlib
import struct
import time

import pytest

from yanjax.core.config import load_config_file
from yanjax.training.writers import (
  JsonlWriter,
  TensorBoardWriter,
  WandbWriter,
  Writers,
  wandb_run_id,
)

REPO = pathlib.Path(__file__).resolve().parent.parent


def wandb_history(run_dir: pathlib.Path, timeout: float = 60.0) -> dict[int, dict]:
  """Step -> {key: value} of the history records in an offline W&B run directory's run-<id>.wandb, once
  the run's exit record is there (W&B's own process may still be writing after `finish` returns).

  The file is W&B's 7-byte header (":W&B", magic, version) then a LevelDB log: 32 KiB blocks of chunks,
  each a 7-byte header (crc32c, length, type: 1 whole, 2 first, 3 middle, 4 last) and a piece of one
  serialized `Record` protobuf. wandb 0.31 ships no Python reader for it."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  deadline = time.time() + timeout
  while True:
    (path,) = run_dir.glob("run-*.wandb")
    records = _log_records(path.read_bytes())
    kinds = [record.WhichOneof("record_type") for record in map(wandb_internal_pb2.Record.FromString, records)]
    if "exit" in kinds or time.time() > deadline:
      break
    time.sleep(0.2)
  history = {}
  for record in map(wandb_internal_pb2.Record.FromString, records):
    if record.WhichOneof("record_type") == "history":
      items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
      history.setdefault(items["_step"], {}).update(items)
  return history


def _log_records(data: bytes) -> list[bytes]:
  assert data[:4] == b":W&B"
  records, record, pos = [], b"", 7
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
      pos += 32768 - pos % 32768
      continue
    length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
    if pos + 7 + length > len(data):  # a chunk still being written
      break
    record += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      records.append(record)
      record = b""
  return records


def test_jsonl_resume_drops_the_steps_after_the_checkpoint(tmp_path):
  writer = JsonlWriter(tmp_path)
  for step in range(1, 7):
    writer.write(step, {"loss": float(step)})
  writer.close()
  writer = JsonlWriter(tmp_path, resume_step=4)  # a run killed after step 6 resumes from its checkpoint at 4
  for step in range(5, 9):
    writer.write(step, {"loss": 10.0 * step})
  writer.close()
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0),
                                                        (6, 60.0), (7, 70.0), (8, 80.0)]


def test_writers_give_tensorboard_and_wandb_the_floats(tmp_path, monkeypatch):
  """One fan-out: JSONL keeps the string ("n/a" MFU); W&B's offline run holds the floats at their steps."""
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path))
  monkeypatch.setenv("WANDB_SILENT", "true")
  cfg = load_config_file(REPO / "configs/yan_tiny.py")
  cfg.train.wandb_project, cfg.train.wandb_mode = "yanjax-test", "offline"
  (tmp_path / "run").mkdir()
  writers = Writers([JsonlWriter(tmp_path / "run"), TensorBoardWriter(tmp_path / "run"),
                     WandbWriter(tmp_path / "run", cfg)])
  writers.write(1, {"loss": 3.5, "mfu": "n/a", "skipped_steps": 0})
  writers.write(2, {"loss": 3.25, "mfu": "n/a", "skipped_steps": 1})
  writers.write(2, {"val_loss": 3.0})
  writers.close()
  records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
  assert records[1]["mfu"] == "n/a" and records[1]["skipped_steps"] == 1.0
  assert list((tmp_path / "run/tensorboard").glob("events.out.tfevents.*"))
  (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{wandb_run_id(tmp_path / 'run')}")
  history = wandb_history(run_dir)
  print(history)
  assert {step: {k: v for k, v in items.items() if not k.startswith("_")} for step, items in history.items()} == {
      1: {"loss": 3.5, "skipped_steps": 0.0}, 2: {"loss": 3.25, "skipped_steps": 1.0, "val_loss": 3.0}}
