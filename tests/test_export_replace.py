"""An export replaces only on success and never what is not an export: a failed export leaves the previous one
intact, locally and in a bucket, and a directory holding anything else is refused untouched."""

import numpy as np
import pytest
from model_helpers import random_model
from test_export import _model

from yanjax.core.config import ConfigError
from yanjax.export import writer as export_module
from yanjax.export.writer import export_model
from yanjax.inference import loading as inference
from yanjax.main import export as export_cli
from yanjax.numpy_runtime import load_export


def _files(path):
  return {p.name: p.read_bytes() for p in path.iterdir()}


def _fail_while_writing_weights(monkeypatch):
  """The export fails half-way (the weights file begun), as a full disk would."""
  def fail(path, *args, **kwargs):
    path.write_bytes(b"half a file")
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(export_module, "_write_npz", fail)
  monkeypatch.setattr(export_module, "_write_safetensors", fail)


def test_failed_export_leaves_the_previous_one_intact(tokenizer_model, tmp_path, monkeypatch):
  old, cfg = _model("yan", vocab_size=320)
  new = random_model(cfg, seed=7)
  out = tmp_path / "out"
  export_model(old, cfg, out, tokenizer_path=tokenizer_model)
  before = _files(out)
  _fail_while_writing_weights(monkeypatch)
  for weights_format in ("npz", "safetensors"):
    with pytest.raises(OSError, match="No space left"):
      export_model(new, cfg, out, weights_format=weights_format)
  assert _files(out) == before  # byte for byte
  assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the temporary directory is gone
  np.testing.assert_array_equal(load_export(out).arrays["embed.embedding"],
                                np.asarray(old.embed.embedding[...]))


def test_export_replaces_an_earlier_export(tokenizer_model, tmp_path):
  model, cfg = _model("yan", vocab_size=320)
  out = tmp_path / "out"
  export_model(model, cfg, out, tokenizer_path=tokenizer_model)
  other = random_model(cfg, seed=7)
  manifest = export_model(other, cfg, out)  # no tokenizer this time: the old one must not linger
  assert sorted(_files(out)) == ["config.json", "manifest.json", "weights.npz"]
  assert load_export(out).manifest == manifest and manifest["tokenizer"] is None
  np.testing.assert_array_equal(load_export(out).arrays["embed.embedding"], np.asarray(other.embed.embedding[...]))
  assert [p.name for p in tmp_path.iterdir()] == ["out"]
  (tmp_path / "empty").mkdir()  # an empty directory is replaced too
  export_model(model, cfg, tmp_path / "empty")
  assert (tmp_path / "empty" / "manifest.json").exists()


def test_out_that_is_not_an_export_is_refused_and_untouched(tmp_path, monkeypatch):
  model, cfg = _model("yan")
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("my notes")
  (mine / "config.json").write_text("{}")
  with pytest.raises(ConfigError, match=rf"{mine} holds files that are not part of a yanjax export "
                                        r"\(notes\.txt\)"):
    export_model(model, cfg, mine)
  assert _files(mine) == {"notes.txt": b"my notes", "config.json": b"{}"}
  other = tmp_path / "other"
  other.mkdir()
  (other / "manifest.json").write_text('{"format": "someone-else"}')
  with pytest.raises(ConfigError, match=r"manifest\.json is not the manifest of a yanjax export"):
    export_model(model, cfg, other)
  assert _files(other) == {"manifest.json": b'{"format": "someone-else"}'}
  a_file = tmp_path / "a_file"
  a_file.write_text("data")
  with pytest.raises(ConfigError, match="not part of a yanjax export"):
    export_model(model, cfg, a_file)
  assert a_file.read_text() == "data"
  # The command line refuses before it reads the checkpoint; `cli.run` makes it one line, exit code 2.
  monkeypatch.setattr(inference, "load_inference_model", lambda *a, **k: pytest.fail("checkpoint read"))
  with pytest.raises(ConfigError, match="notes.txt"):
    export_cli.main(["--workdir", "run", "--out", str(mine)])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "mine", "other"]


def test_bucket_export_is_replaced_manifest_last_and_kept_on_failure(s3_bucket, monkeypatch):
  from etils import epath  # pylint: disable=import-outside-toplevel

  from yanjax.core import storage  # pylint: disable=import-outside-toplevel
  model, cfg = _model("yan")
  url = f"{s3_bucket}/exports/m"
  fs = epath.backend.fsspec_backend.fs(url)

  def objects(prefix):
    fs.invalidate_cache()
    key = prefix.split("://", 1)[1]
    return {k[len(key) + 1:]: fs.cat_file(k) for k in fs.find(key + "/")}

  export_model(model, cfg, url)
  before = objects(url)
  assert sorted(before) == ["config.json", "manifest.json", "weights.npz"]
  with monkeypatch.context() as patch:
    _fail_while_writing_weights(patch)
    with pytest.raises(OSError, match="No space left"):
      export_model(random_model(cfg, seed=7), cfg, url)
  assert objects(url) == before
  assert not any(".tmp-" in key for key in objects(s3_bucket))

  calls = []  # the bucket's own order: the old manifest deleted first, the new one copied last
  filesystem = storage._filesystem  # pylint: disable=protected-access

  class Recording:
    def __init__(self, real):
      self.real = real

    def __getattr__(self, name):
      attr = getattr(self.real, name)
      if name not in ("rm_file", "rm", "copy"):
        return attr
      return lambda *a, **k: (calls.append((name, a[0])), attr(*a, **k))[1]

  monkeypatch.setattr(storage, "_filesystem", lambda path: Recording(filesystem(path)))
  other = random_model(cfg, seed=7)
  manifest = export_model(other, cfg, url)
  key = url.split("://", 1)[1]
  assert calls[0] == ("rm_file", f"{key}/manifest.json")
  copies = [c[1] for c in calls if c[0] == "copy"]
  assert copies[-1].endswith("/manifest.json") and ".tmp-" in copies[-1]  # a single key, after the rest
  assert load_export(url).manifest == manifest
  np.testing.assert_array_equal(load_export(url).arrays["embed.embedding"], np.asarray(other.embed.embedding[...]))
  assert not any(".tmp-" in k for k in objects(s3_bucket))

  (epath.Path(url) / "notes.txt").write_text("my notes")
  with pytest.raises(ConfigError, match=rf"{url} holds files that are not part of a yanjax export \(notes\.txt\)"):
    export_model(model, cfg, url)
  assert objects(url)["notes.txt"] == b"my notes" and load_export(url).manifest == manifest
  with pytest.raises(ConfigError, match="is a bucket"):
    export_model(model, cfg, s3_bucket)
