"""Which implementation runs a training pass of causal attention (`model.attention_kernel`), and its fused form.

"xla" is the explicit-mask form of yanjax/model/attention.py and swa.py (XLA materialises [b, H, t, s] scores);
"cudnn" is cuDNN's flash attention through `jax.nn.dot_product_attention(implementation="cudnn")` on NVIDIA GPUs,
for bfloat16/float16 and the head widths it supports; "auto" (the default) takes cuDNN where it can run and XLA
elsewhere (CPU, TPU, ROCm, float32), never an error. Asking for "cudnn" where it cannot run is one line naming the
key: float32, a head width it lacks or a sequence split over devices (`mesh.sequence`: cuDNN's call takes whole
sequences) at config time, the backend, GPU or length at trace time.

The fused form states the masks as cuDNN runs them: causality as `is_causal` and the window as `local_window_size`
(no mask tensor); packed documents as a boolean [b, 1, t, t] mask of equal segments, which the public API can
only take as `mask=` (jax adds it to the logits as a bias, inside the fused kernel: no [b, H, t, t] scores).
Decoding (a KV cache or a ring, a few queries) stays on the explicit-mask XLA form.
Shapes: the legend in docs/model.md (t: query time).
"""

from __future__ import annotations

import jax
import jax.extend.backend
import jax.numpy as jnp

from yanjax.core.config import ConfigError

KERNELS = ("auto", "xla", "cudnn")  # model.attention_kernel
ATTENTION_MIXERS = ("attention", "swa")  # model.pattern's names that run here (tests: the registry's Attentions)
CUDNN_DTYPES = ("bfloat16", "float16")


def config_problem(dtype: str, head_dim: int) -> str | None:
  """Why cuDNN flash attention cannot run a model of compute `dtype` and head width Dh on any GPU, or None."""
  if dtype not in CUDNN_DTYPES:
    return f"cuDNN flash attention runs {' or '.join(CUDNN_DTYPES)}, not model.dtype={dtype!r}"
  if head_dim % 8 or head_dim > 256:
    return f"cuDNN flash attention needs a head width D / H that is a multiple of 8 and at most 256, not {head_dim}"
  return None


def cuda_capability() -> tuple[int, ...] | None:
  """The default backend's CUDA compute capability ((9, 0) on an H100), or None off NVIDIA GPUs."""
  if jax.default_backend() != "gpu" or "cuda" not in jax.extend.backend.get_backend().platform_version:
    return None
  return tuple(int(n) for n in jax.devices()[0].compute_capability.split("."))


# NVIDIA device kinds (as `--device_kind` names them) and their CUDA compute capability: the plan's view of a
# target GPU, which it never touches.
GPU_CAPABILITY = {"A100": (8, 0), "L4": (8, 9), "H100": (9, 0), "H200": (9, 0), "B200": (10, 0)}


SPLIT_PROBLEM = "cuDNN flash attention takes whole sequences, and mesh.sequence splits them over devices"


def problem(dtype: str, head_dim: int, length: int, capability: tuple[int, ...] | None = None,
            length_ways: int = 1) -> str | None:
  """Why cuDNN flash attention cannot run a training pass of `length` tokens split over `length_ways` devices
  (sequence parallelism) on a GPU of `capability` (None: this machine's), or None."""
  why = config_problem(dtype, head_dim)
  if why:
    return why
  if length_ways > 1:
    return SPLIT_PROBLEM
  capability = capability or cuda_capability()
  if capability is None:
    return f"cuDNN flash attention runs on NVIDIA GPUs, and this backend is {jax.default_backend()}"
  if capability < (8, 0):
    return f"cuDNN flash attention needs compute capability >= 8.0, this GPU has {capability}"
  if capability < (9, 0) and head_dim > 128:
    return f"cuDNN flash attention before Hopper (compute capability 9.0) takes head widths <= 128, not {head_dim}"
  if length % 2:
    return f"cuDNN flash attention with a document mask trains even lengths only, not {length} tokens"
  return None


def planned(cfg, device_kind: str, length: int, length_ways: int = 1) -> str:
  """The implementation ("cudnn" or "xla") ModelConfig `cfg`'s training passes of `length` tokens split over
  `length_ways` devices would take on a device of `device_kind` (an unlisted kind: XLA), for the memory plan;
  never raises."""
  matches = [kind for kind in GPU_CAPABILITY if kind.lower() in device_kind.lower()]
  if cfg.attention_kernel == "xla" or not matches:
    return "xla"
  capability = GPU_CAPABILITY[max(matches, key=len)]
  return "xla" if problem(cfg.dtype, cfg.head_dim, length, capability, length_ways) else "cudnn"


def choose(requested: str, dtype, head_dim: int, length: int, length_ways: int = 1) -> str:
  """The implementation ("cudnn" or "xla") of a training pass of `length` tokens in compute `dtype`, split over
  `length_ways` devices.

  "auto": cuDNN where `problem` finds none, else XLA; "cudnn" where it cannot run: ConfigError, one line.
  """
  if requested == "xla":
    return "xla"
  why = problem(jnp.dtype(dtype).name, head_dim, length, length_ways=length_ways)
  if why is None:
    return "cudnn"
  if requested == "cudnn":
    raise ConfigError(f"model.attention_kernel='cudnn': {why}; set model.attention_kernel='auto' (cuDNN where "
                      "it can run, XLA elsewhere) or 'xla'")
  return "xla"


def for_run(cfg, length: int, length_ways: int = 1) -> str | None:
  """The implementation ("cudnn" or "xla") of the training passes of `length` tokens (split over `length_ways`
  devices) of ModelConfig `cfg`'s attention layers, for logs and benchmark lines; None for a model without any.
  Raises as `choose` does."""
  if not set(cfg.pattern) & set(ATTENTION_MIXERS):
    return None
  return choose(cfg.attention_kernel, cfg.dtype, cfg.head_dim, length, length_ways)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, window: int | None = None,
                    implementation: str = "cudnn") -> jax.Array:
  """q, k, v [b, t, H, Dh], segment_ids [b, t] -> attended [b, t, H, Dh]: the query at row i sees the keys at rows
  j <= i of its segment (and i - j < `window` when given), the masks as cuDNN takes them (module docstring).

  `implementation` is the only difference between the cuDNN call and its XLA twin ("xla": the same masks combined
  into one [b, H, t, t] mask), which the tests compare on CPU against the explicit-mask forms.
  """
  t = q.shape[1]
  same_segment = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [b, 1, t, t]
  local = (window - 1, 0) if window is not None and window < t else None  # a window of t or more masks nothing
  return jax.nn.dot_product_attention(q, k, v, mask=same_segment, is_causal=True, local_window_size=local,
                                      implementation=implementation)
