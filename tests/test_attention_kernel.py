"""model.attention_kernel: the masks of the cuDNN call (is_causal, local_window_size, the document mask), run on CPU
through XLA, equal the explicit masks of attention and sliding-window attention (outputs and gradients); the choice
("auto" never errors, "cudnn" where it cannot run is one line naming the key); the GPU lowering of the mixers holds
cuDNN's fused attention for bfloat16 and not for float32 (cross-lowered for "cuda" on this CPU)."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax._src.cudnn import fused_attention_stablehlo

from yanjax.core.config import ConfigError
from yanjax.model import attention_kernel
from yanjax.model.attention import Attention
from yanjax.model.config import ModelConfig
from yanjax.model.layers import BlockInputs
from yanjax.model.mixers import MIXERS

B, T, D = 2, 12, 32
SEGMENTS = [[1] * 5 + [2] * 7, [1] * 9 + [0] * 3]  # two packed documents; one document then padding (segment 0)


def _mixer(pattern, window=4, dtype="float32"):
  cfg = ModelConfig(pattern=(pattern,), width=D, heads=2, window=window, dtype=dtype, init_std=0.5)
  return MIXERS[pattern](cfg, rngs=nnx.Rngs(0))


def _inputs():
  segment_ids = jnp.asarray(SEGMENTS, jnp.int32)
  reset = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return BlockInputs(reset, segment_ids, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), None)


def _loss_and_grads(mixer, x):
  """The mixer's y [b, t, D] and the gradients of sum(y^2) w.r.t. its parameters and x, in one jitted call."""
  graphdef, params = nnx.split(mixer)

  def loss(params, x):
    y, _ = nnx.merge(graphdef, params)(x, _inputs())
    return jnp.sum(y.astype(jnp.float32) ** 2), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return y, grads


@pytest.mark.parametrize("pattern,window", [("attention", 4), ("swa", 4), ("swa", 8), ("swa", 16)],
                         ids=["attention", "swa_blocked", "swa_dense", "swa_window_over_t"])
def test_the_cudnn_masks_equal_the_explicit_masks(monkeypatch, pattern, window):
  """The mixer's cuDNN branch, run through XLA, against its CPU (explicit-mask) path: W = 4 < t / 2 is the blocked
  form, W = 8 the dense one, W = 16 >= t a window that masks nothing (the fused call drops it)."""
  mixer, x = _mixer(pattern, window), jax.random.normal(jax.random.PRNGKey(1), (B, T, D))
  y_ref, grads_ref = _loss_and_grads(mixer, x)
  calls, fused = [], attention_kernel.fused_attention

  def fused_on_xla(*args):
    calls.append(args[4:])  # the window
    return fused(*args, implementation="xla")

  monkeypatch.setattr(attention_kernel, "choose", lambda *_: "cudnn")
  monkeypatch.setattr(attention_kernel, "fused_attention", fused_on_xla)
  y, grads = _loss_and_grads(mixer, x)
  assert calls == [() if pattern == "attention" else (window,)]
  errors = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
            for a, b in zip(jax.tree.leaves((y, grads)), jax.tree.leaves((y_ref, grads_ref)))]
  print(f"max abs diff / max |reference|, output then gradients: {errors}")
  assert max(errors) < 1e-5


def test_the_choice(monkeypatch):
  """Off NVIDIA GPUs "auto" is XLA and "cudnn" one line; on one (faked), cuDNN for bfloat16 at the head widths,
  lengths and GPUs it supports, XLA otherwise under "auto"."""
  choose = attention_kernel.choose
  assert choose("auto", jnp.bfloat16, 64, T) == "xla"  # this CPU
  with pytest.raises(ConfigError, match=r"^model\.attention_kernel='cudnn': cuDNN flash attention runs on NVIDIA "
                                        r"GPUs, and this backend is cpu; set model\.attention_kernel='auto'"):
    choose("cudnn", jnp.bfloat16, 64, T)
  monkeypatch.setattr(attention_kernel, "cuda_capability", lambda: (9, 0))
  assert choose("auto", jnp.bfloat16, 64, T) == choose("cudnn", jnp.float16, 256, T) == "cudnn"
  assert choose("xla", jnp.bfloat16, 64, T) == "xla"
  for dtype, head_dim, length, why in [(jnp.float32, 64, T, "runs bfloat16 or float16"),
                                       (jnp.bfloat16, 60, T, "multiple of 8"), (jnp.bfloat16, 64, 11, "even lengths")]:
    assert choose("auto", dtype, head_dim, length) == "xla"
    with pytest.raises(ConfigError, match=why):
      choose("cudnn", dtype, head_dim, length)
  monkeypatch.setattr(attention_kernel, "cuda_capability", lambda: (8, 0))
  assert choose("auto", jnp.bfloat16, 256, T) == "xla" and choose("auto", jnp.bfloat16, 128, T) == "cudnn"
  monkeypatch.setattr(attention_kernel, "cuda_capability", lambda: (7, 5))
  assert choose("auto", jnp.bfloat16, 64, T) == "xla"


@pytest.mark.parametrize("changes,why", [
    (dict(attention_kernel="flash"), r"must be one of \('auto', 'xla', 'cudnn'\)"),
    (dict(attention_kernel="cudnn"), r"runs bfloat16 or float16, not model\.dtype='float32'"),
    (dict(attention_kernel="cudnn", dtype="bfloat16", width=48, heads=4), r"multiple of 8 and at most 256, not 12"),
])
def test_a_kernel_that_cannot_run_is_refused_at_config_time(changes, why):
  with pytest.raises(ConfigError, match=rf"^model\.attention_kernel=.*{why}"):
    ModelConfig(**changes)
  assert ModelConfig(**{**changes, "attention_kernel": "auto"}).attention_kernel == "auto"


def test_the_run_kernel_names_the_attention_mixers():
  """for_run (the trainer's log, the benchmarks' lines) knows the mixers that run here: the registry's Attentions."""
  assert {name for name, cls in MIXERS.items() if issubclass(cls, Attention)} == set(attention_kernel.ATTENTION_MIXERS)
  assert attention_kernel.for_run(ModelConfig(pattern=("mcsd",)), T) is None
  assert attention_kernel.for_run(ModelConfig(pattern=("swa", "mcsd"), dtype="bfloat16"), T) == "xla"  # this CPU


def _cuda_lowering(mixer) -> str:
  """The StableHLO text of the mixer's jitted forward + backward (as in _loss_and_grads) lowered for "cuda"."""
  graphdef, params = nnx.split(mixer)

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params)(x, _inputs())[0].astype(jnp.float32) ** 2)

  x = jax.ShapeDtypeStruct((B, T, D), jnp.dtype(mixer.cfg.dtype))
  return jax.jit(jax.grad(loss, argnums=(0, 1))).trace(params, x).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("pattern", ["attention", "swa"])
def test_the_gpu_lowering_holds_cudnn_flash_attention_for_bfloat16_only(monkeypatch, pattern):
  """The jitted forward + backward lowered for "cuda" on this CPU, as on an H100 (faked: its capability, jax's
  cuDNN version probe): cuDNN's fused attention (forward and backward, causal, the window as its own length) for
  bfloat16; XLA's, no custom call, for float32."""
  monkeypatch.setattr(attention_kernel, "cuda_capability", lambda: (9, 0))
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
  for dtype, expect in (("bfloat16", True), ("float32", False)):
    text = _cuda_lowering(_mixer(pattern, 4, dtype))
    calls = sorted(set(re.findall(r"__cudnn\$\w+", text)))
    print(dtype, calls)
    if not expect:
      assert not calls
      continue
    assert calls == ["__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"]
    assert set(re.findall(r"mask_type\\22: \\22(\w+)", text)) == {"CAUSAL"}
    window = set(re.findall(r"sliding_window_length\\22: (\d+)", text))
    assert window == ({"4"} if pattern == "swa" else {"0"})
