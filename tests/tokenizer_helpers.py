"""Test tokenizers built on the spot (nothing is downloaded)."""

from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def byte_level_bpe(texts: Sequence[str], special_tokens: Sequence[str], vocab_size: int = 400) -> bytes:
  """A byte-level BPE tokenizer.json (as GPT-2 / Llama-3 / Qwen use) trained on `texts`."""
  hf = Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  hf.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  return hf.to_str().encode("utf-8")


def word_level(num_words: int) -> bytes:
  """A tokenizer.json of `num_words` words (w0, w1, ...) plus <unk>, <s>, </s>: a large vocabulary, quickly."""
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(num_words)}}
  hf = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  hf.add_special_tokens(["<unk>", "<s>", "</s>"])
  return hf.to_str().encode("utf-8")
