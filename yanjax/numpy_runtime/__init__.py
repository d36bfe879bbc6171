"""A NumPy-only runtime for yanjax exports: load, check, run the forward pass and the recurrent decode.

Depends on NumPy; nothing here imports JAX, so the package can be copied out of the repository as it is.
Text (__main__ only) also needs yanjax.data.tokenizer, with sentencepiece or tokenizers (no JAX either).
docs/export.md is its specification.

    from yanjax.numpy_runtime import Model, generate, load_export
    model = Model(load_export("export_dir"))
    logits = model.forward(tokens)                      # [b, t] -> [b, t, V] float32
    completions = generate(model, [[1, 17, 42]], max_new_tokens=32, eos_id=2)

Tolerance against the JAX model (float32 weights, float32 compute): max abs logit difference below 1e-4 for
the test models (tests/test_export.py), and greedy completions equal token for token.
"""

from .attention import KVState
from .format import (
                     FORMAT,
                     FORMAT_VERSION,
                     Export,
                     ExportError,
                     array_sha256,
                     bf16_bits_to_float32,
                     expected_shapes,
                     float32_to_bf16_bits,
                     load_export,
                     read_npz,
                     read_safetensors,
)
from .generate import Completion, generate
from .mcsd import MCSDState
from .mixers import TWINS
from .model import Model, State
from .sampling import sample

__all__ = [
    "Completion", "Export", "ExportError", "FORMAT", "FORMAT_VERSION", "KVState", "MCSDState", "Model",
    "State", "array_sha256", "bf16_bits_to_float32", "expected_shapes", "float32_to_bf16_bits", "generate",
    "load_export", "read_npz", "read_safetensors", "sample", "TWINS",
]
