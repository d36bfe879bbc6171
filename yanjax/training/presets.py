"""Model variants shared by the config files: selective activation, data-dependent decay, the attention baseline,
the hybrid.

A config file calls `build_config(model, variant)` with its Yan (MCSD) model; the variant is the text after
the colon of `--config configs/<name>.py:<variant>`:
  ""           the Yan model as written (dense GeGLU FFN)
  "selective"  the same with the selective-activation router over FFN neuron groups
  "mcsd_dd"    the same with MCSD's decay rates gated per token (mixer "mcsd_dd", beyond the paper; dense FFN)
  "attention"  the LLaMA-style baseline with the same width, depth and vocabulary, and the FFN width that
               matches the Yan model's total parameter count (see `matched`)
  "hybrid"     sliding-window attention and MCSD layers alternating, attention first (`HYBRID_PATTERN`), window
               min(HYBRID_WINDOW, train.seq_len), FFN width matched to the Yan model's parameters likewise
  "long"       the Yan model as written, trained on sequences of LONG_SEQ_LEN (a million) tokens: a change of the
               run, not the model (`long_context`): sequence parallelism, docs/sequence_parallel.md

The hybrid's design (docs/model.md, "The hybrid"): Samba's 1:1 interleaving rather than Griffin's 2:1, because
every shipped depth divides by 2 and not all by 3 (yan_tiny has 2 layers, yan_3b 20); attention first, because
the A/B measured it ahead of MCSD first at every length (docs/results.md, "The hybrid"); Griffin's window of 1024
tokens, which bounds the decode state (at 32k tokens of context, 1/64 of the attention baseline's KV cache).
"""

from __future__ import annotations

from typing import Any

from yanjax.core.config import ConfigError
from yanjax.model.config import ModelConfig
from yanjax.model.counting import param_count

VARIANTS = ("", "selective", "mcsd_dd", "attention", "hybrid")  # variants that change the model
LONG_SEQ_LEN = 2 ** 20
HYBRID_PATTERN = ("swa", "mcsd")
HYBRID_WINDOW = 1024
# Capacity dispatch: faster than the dense FFN on CPU where dropless (ragged_dot, dense there) is slower
# (benchmarks/selective.py, benchmarks/RESULTS.md); both are linear in the sequence length.
SELECTIVE_DEFAULTS = {"router": True, "groups": 16, "top_k": 4, "dispatch": "capacity"}


def matched(cfg: ModelConfig, pattern: tuple[str, ...], multiple: int = 8, **changes) -> ModelConfig:
  """`cfg` with the layer pattern `pattern` (dense FFN, `changes` applied) and the closest total parameter count
  to `cfg`'s: only the FFN width changes (rounded to `multiple`); attention heads of width 64 (or D / 2 for very
  narrow models)."""
  heads = max(cfg.width // 64, 2)
  base = cfg.replace(pattern=pattern, heads=heads, router=False, **changes)
  per_unit = 3 * cfg.width * cfg.layers  # parameters per unit of FFN width
  gap = param_count(cfg).total - param_count(base).total
  mlp_width = max(multiple, base.mlp_width + round(gap / per_unit / multiple) * multiple)
  return base.replace(mlp_width=mlp_width)


def model_variant(model: dict[str, Any], variant: str, seq_len: int) -> ModelConfig:
  """The ModelConfig of `variant` of the Yan model given as a dict, for training on sequences of `seq_len`."""
  if variant not in VARIANTS:
    raise ConfigError(f"unknown config variant {variant!r}; choose one of {VARIANTS + tuple(RUN_VARIANTS)}")
  cfg = ModelConfig.from_dict(model)
  if variant == "selective":
    return cfg.replace(**SELECTIVE_DEFAULTS)
  if variant == "mcsd_dd":
    return cfg.replace(pattern=("mcsd_dd",))
  if variant == "attention":
    return matched(cfg, ("attention",))
  if variant == "hybrid":
    return matched(cfg, HYBRID_PATTERN, window=min(HYBRID_WINDOW, seq_len))
  return cfg


def long_context(sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """The run `sections` on sequences of LONG_SEQ_LEN tokens: the config's tokens per step rounded to whole
  sequences (at least one), no gradient accumulation, each sequence's time split over the devices
  (mesh.sequence=-1) and the few sequences, with the parameters, over fsdp (the batch rule splits sequences over
  fsdp, so fsdp can take at most one per sequence)."""
  train, mesh = sections["train"], sections["mesh"]
  batch = max(1, round(train["global_batch"] * train["seq_len"] / LONG_SEQ_LEN))
  return {**sections, "train": {**train, "seq_len": LONG_SEQ_LEN, "global_batch": batch, "grad_accum": 1},
          "mesh": {**mesh, "data": 1, "fsdp": batch, "sequence": -1, "expert": 1}}


RUN_VARIANTS = {"long": long_context}  # variants that change the run, not the model


def build_config(model: dict[str, Any], variant: str | None, **sections):
  """The run config (a locked ml_collections.ConfigDict): the model of `variant` (or the run of a RUN_VARIANTS
  one), trainer defaults updated by `sections` (see yanjax.training.run_config.DEFAULTS)."""
  from yanjax.training.run_config import build_run_config  # pylint: disable=import-outside-toplevel

  if variant in RUN_VARIANTS:
    sections, variant = RUN_VARIANTS[variant](sections), ""
  return build_run_config(model_variant(model, variant or "", sections["train"]["seq_len"]), **sections)
