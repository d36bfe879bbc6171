"""Training and applying the sentencepiece tokenizer stored with a dataset.

Trained models round-trip text exactly: no normalization, whitespace kept as is, no dummy prefix, and
byte fallback for characters outside the vocabulary. Ids 0, 1, 2 are <unk>, <s> (bos), </s> (eos).
"""

from __future__ import annotations

import io
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from yanjax.data.errors import CorpusError, TokenizerMismatchError

MODEL_TYPES = ("bpe", "unigram")
_SENTENCE_CHARS = 4096  # training sentences are cut at line ends to at most this many characters


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


def train(sentences: list[str], vocab_size: int, model_type: str, num_threads: int) -> bytes:
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
    raise CorpusError(f"training a {model_type} tokenizer of {vocab_size} pieces on a {size}-byte "
                      f"sample failed: {e}. Lower --vocab_size or raise --tokenizer_sample_bytes") from e
  return model.getvalue()


def load(model: bytes) -> spm.SentencePieceProcessor:
  """A processor for a serialized model; it must define bos and eos, which frame every document."""
  try:
    processor = spm.SentencePieceProcessor(model_proto=model)
  except RuntimeError as e:
    raise TokenizerMismatchError(f"not a sentencepiece model ({e})") from e
  if processor.bos_id() < 0 or processor.eos_id() < 0:
    raise TokenizerMismatchError("the tokenizer model defines no bos or eos piece, which frame every "
                                 "stored document; train it with bos_id and eos_id set, or leave out "
                                 "--tokenizer_model to have one trained")
  return processor


def encode(processor: spm.SentencePieceProcessor, texts: list[str],
           num_threads: int) -> list[np.ndarray]:
  """Each text as int32 ids framed by bos and eos, encoded on `num_threads` threads."""
  return processor.encode(texts, add_bos=True, add_eos=True, return_type="numpy",
                          num_threads=num_threads)
