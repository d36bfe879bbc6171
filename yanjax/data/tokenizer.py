"""The tokenizer of a dataset, a run and an export: a sentencepiece model or a Hugging Face tokenizer.json.

`from_bytes` reads either file into a `Tokenizer` (the kind is detected from the bytes); every consumer
(data preparation, the trainer's sample, generation, export) uses only its interface. Documents are framed
`bos ... eos`, so a tokenizer must define both.

Sentencepiece models trained here (`train_sentencepiece`) round-trip text exactly: no normalization,
whitespace kept as is, no dummy prefix, and byte fallback for characters outside the vocabulary. Ids 0, 1, 2
are <unk>, <s> (bos), </s> (eos). A byte-level BPE tokenizer.json (GPT-2, Llama-3, Qwen) round-trips text too;
its special tokens written as text in a document are encoded as text, never as their special ids, as
sentencepiece does with <s> and </s>.

This module needs NumPy and sentencepiece (and `tokenizers` for a tokenizer.json), never JAX: the NumPy
runtime uses it.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Iterable, Iterator

import numpy as np
import sentencepiece as spm

from yanjax.data.errors import CorpusError, TokenizerMismatchError

MODEL_TYPES = ("bpe", "unigram")
FILE_NAMES = {"sentencepiece": "tokenizer.model", "huggingface": "tokenizer.json"}  # kind -> file name
# Special tokens of a tokenizer.json taken as bos / eos, in order of preference.
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|endoftext|>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
_SENTENCE_CHARS = 4096  # training sentences are cut at line ends to at most this many characters
_FIX = "give a sentencepiece .model or a Hugging Face tokenizer.json"


class Tokenizer:
  """A loaded tokenizer; `data` is its file as given, written unchanged to stores, workdirs and exports.

  Every id it produces is < `vocab_size`; `unk_id` is None when the model has none (byte-level BPE).
  """

  kind: str

  def __init__(self, data: bytes, source: str, bos_id: int, eos_id: int, unk_id: int | None, vocab_size: int):
    self.data, self.source = data, source
    self.sha256 = hashlib.sha256(data).hexdigest()
    self.bos_id, self.eos_id, self.unk_id, self.vocab_size = bos_id, eos_id, unk_id, vocab_size

  @property
  def file_name(self) -> str:
    return FILE_NAMES[self.kind]

  def encode(self, text: str) -> list[int]:
    """The ids of `text`, without bos or eos."""
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids` (bos, eos and other special ids give no text); the inverse of `encode`."""
    raise NotImplementedError

  def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
    """Each text as int32 ids [n + 2]: bos, the ids of the text, eos."""
    raise NotImplementedError

  def token_bytes(self) -> np.ndarray:
    """int32 [vocab_size]: how many UTF-8 bytes of decoded text each id stands for (0 for bos, eos and other
    special ids, and for ids with no text): the denominator of bits per byte. Over the ids of `encode(text)`
    they add up to len(text.encode()) for the tokenizers that round-trip text (those trained here, byte-level
    BPE)."""
    raise NotImplementedError

  def metadata(self) -> dict:
    """What a store's or an export's metadata records of the tokenizer (JSON-able)."""
    return {"kind": self.kind, "file": self.file_name, "sha256": self.sha256, "vocab_size": self.vocab_size,
            "unk_id": self.unk_id, "bos_id": self.bos_id, "eos_id": self.eos_id}

  def __reduce__(self):  # pickled as its file (for worker processes): the processors need not pickle
    return from_bytes, (self.data, self.source)


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model (tokenizer.model)."""

  kind = "sentencepiece"

  def __init__(self, data: bytes, source: str, processor: spm.SentencePieceProcessor):
    unk = processor.unk_id()
    super().__init__(data, source, processor.bos_id(), processor.eos_id(), unk if unk >= 0 else None,
                     processor.vocab_size())
    self.processor = processor

  def encode(self, text: str) -> list[int]:
    return self.processor.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self.processor.decode([int(i) for i in ids])

  def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
    return self.processor.encode(texts, add_bos=True, add_eos=True, return_type="numpy", num_threads=1)

  def token_bytes(self) -> np.ndarray:
    """A byte-fallback piece is one byte; "▁" is the space it escapes (a model with a dummy prefix counts
    the leading space that decoding drops); control and unknown pieces are none."""
    p = self.processor
    return np.array([0 if p.is_control(i) or p.is_unknown(i) or p.is_unused(i) else 1 if p.is_byte(i)
                     else len(p.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
                     for i in range(self.vocab_size)], np.int32)


class HuggingFaceTokenizer(Tokenizer):
  """A Hugging Face `tokenizers` tokenizer.json; bos and eos are special tokens named as in BOS_NAMES /
  EOS_NAMES. Its truncation and padding settings are ignored, and special tokens in text are text."""

  kind = "huggingface"

  def __init__(self, data: bytes, source: str, hf, bos_id: int, eos_id: int):
    unk_token = getattr(hf.model, "unk_token", None)
    unk = hf.token_to_id(unk_token) if unk_token else None
    ids = hf.get_vocab(with_added_tokens=True).values()
    super().__init__(data, source, bos_id, eos_id, unk,
                     max(hf.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1))
    self.hf = hf

  def encode(self, text: str) -> list[int]:
    return self.hf.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

  def token_bytes(self) -> np.ndarray:
    """A byte-level model's vocabulary (GPT-2, Llama-3, Qwen) writes each byte as one character, so a token is
    as many bytes as characters (exact also for a token that is part of a character); other models' tokens,
    and added tokens, count the bytes they decode to alone. Special tokens, and ids without a token, are none."""
    import tokenizers  # pylint: disable=import-outside-toplevel
    added = self.hf.get_added_tokens_decoder()
    byte_level = isinstance(self.hf.decoder, tokenizers.decoders.ByteLevel)
    lengths = np.zeros(self.vocab_size, np.int32)
    for token, i in self.hf.get_vocab(with_added_tokens=True).items():
      if i in added and added[i].special:
        continue
      lengths[i] = len(token) if byte_level and i not in added else len(self.hf.decode([i]).encode("utf-8"))
    return lengths

  def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
    out = []
    for encoding in self.hf.encode_batch(texts, add_special_tokens=False):
      ids = np.empty(len(encoding.ids) + 2, np.int32)
      ids[0], ids[1:-1], ids[-1] = self.bos_id, encoding.ids, self.eos_id
      out.append(ids)
    return out


def from_bytes(data: bytes, source: str) -> Tokenizer:
  """The tokenizer in `data`: a Hugging Face tokenizer.json (a JSON object with a "model" key) or a
  sentencepiece model. `source` (a path, or the flag that gave it) is named in errors.

  Raises:
    TokenizerMismatchError when `data` is neither, or the tokenizer defines no bos or eos.
  """
  try:
    parsed, json_error = json.loads(data), None
  except ValueError as e:  # UnicodeDecodeError included: a sentencepiece model is binary
    parsed, json_error = None, e
  if isinstance(parsed, dict) and "model" in parsed:
    return _huggingface(data, source)
  if json_error is None:
    raise _not_a_tokenizer(source, "it is JSON without a \"model\" key, so not a tokenizer.json")
  try:
    processor = spm.SentencePieceProcessor(model_proto=data)
  except RuntimeError as e:
    reason = (f"invalid JSON ({json_error})" if data.lstrip()[:1] in (b"{", b"[")
              else "neither JSON nor a sentencepiece model")
    raise _not_a_tokenizer(source, reason) from e
  if processor.bos_id() < 0 or processor.eos_id() < 0:
    raise TokenizerMismatchError(f"{source}: the tokenizer model defines no bos or eos piece, which frame every "
                                 "stored document; train it with bos_id and eos_id set, or leave out "
                                 "--tokenizer_model to have one trained")
  return SentencePieceTokenizer(data, source, processor)


def _huggingface(data: bytes, source: str) -> HuggingFaceTokenizer:
  import tokenizers  # pylint: disable=import-outside-toplevel  # only for a tokenizer.json
  try:
    hf = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
  except Exception as e:  # pylint: disable=broad-except  # tokenizers raises a bare Exception
    raise _not_a_tokenizer(source, f"the tokenizers library cannot read it ({_first_line(e)})") from e
  hf.no_truncation()
  hf.no_padding()
  hf.encode_special_tokens = True  # "<|endoftext|>" written in a document is text, not the eos id
  special = {token.content: i for i, token in hf.get_added_tokens_decoder().items() if token.special}
  bos = next((special[name] for name in BOS_NAMES if name in special), None)
  eos = next((special[name] for name in EOS_NAMES if name in special), None)
  if bos is None or eos is None:
    which, names = ("bos", BOS_NAMES) if bos is None else ("eos", EOS_NAMES)
    raise TokenizerMismatchError(
        f"{source}: the tokenizer.json has no special token for {which}, which frames every document (looked "
        f"for {', '.join(names)} among its special added tokens); add one of them as a special token")
  return HuggingFaceTokenizer(data, source, hf, bos, eos)


def _not_a_tokenizer(source: str, reason: str) -> TokenizerMismatchError:
  return TokenizerMismatchError(f"{source} is not a tokenizer: {reason}; {_FIX}")


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def read(path) -> Tokenizer:
  """The tokenizer in the file `path` (a pathlib or etils path: local, gs:// or s3://), named by it in errors."""
  return from_bytes(path.read_bytes(), str(path))


def find_file(directory) -> Any:
  """The tokenizer file of `directory` (a pathlib or etils path): tokenizer.model or tokenizer.json, or None.

  Raises:
    TokenizerMismatchError when it holds both: which one its data was tokenized with is unknown.
  """
  found = [directory / name for name in FILE_NAMES.values() if (directory / name).exists()]
  if len(found) > 1:
    raise TokenizerMismatchError(f"{directory} holds both {' and '.join(FILE_NAMES.values())}: remove the one "
                                 "that is not the tokenizer of its data")
  return found[0] if found else None


# ---- training a sentencepiece model -----------------------------------------------------------------

def sample_sentences(texts: Iterable[str], budget_bytes: int) -> list[str]:
  """Training sentences from the first `budget_bytes` (UTF-8) of `texts`, cut at line ends."""
  sentences, total = [], 0
  for text in texts:
    for sentence in _split_lines(text, _SENTENCE_CHARS):
      sentences.append(sentence)
      total += len(sentence.encode("utf-8"))
      if total >= budget_bytes:
        return sentences
  return sentences


def _split_lines(text: str, max_chars: int) -> Iterator[str]:
  """Consecutive whole lines of `text` joined up to `max_chars`; longer lines are cut."""
  piece, size = [], 0
  for line in text.splitlines(keepends=True):
    for start in range(0, len(line), max_chars):
      part = line[start:start + max_chars]
      if size + len(part) > max_chars:
        yield "".join(piece)
        piece, size = [], 0
      piece.append(part)
      size += len(part)
  if piece:
    yield "".join(piece)


def train_sentencepiece(sentences: list[str], vocab_size: int, model_type: str, num_threads: int) -> bytes:
  """A serialized sentencepiece model of `vocab_size` pieces trained on `sentences`."""
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
        allow_whitespace_only_pieces=True, max_sentence_length=4 * _SENTENCE_CHARS,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=num_threads, minloglevel=2)
  except RuntimeError as e:
    size = sum(len(s.encode("utf-8")) for s in sentences)
    fix = ("Raise --vocab_size: it must hold every character of the sample" if "required_chars" in str(e)
           else "Lower --vocab_size or raise --tokenizer_sample_bytes")
    raise CorpusError(f"training a {model_type} tokenizer of {vocab_size} pieces on a {size}-byte "
                      f"sample failed: {e}. {fix}") from e
  return model.getvalue()
