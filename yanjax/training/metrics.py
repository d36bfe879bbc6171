"""Model FLOPs utilisation: the model's training FLOPs per token against the devices' peak (writers: writers.py)."""

from __future__ import annotations

# Dense bfloat16 peak FLOP/s per device, from vendor data sheets (no sparsity). MFU divides by these.
PEAK_FLOPS = {
    "H100": 989e12,  # H100 SXM
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  """Peak of the longest table key contained in the device kind (e.g. 'NVIDIA H100 80GB HBM3'), else None."""
  matches = [key for key in PEAK_FLOPS if key.lower() in device_kind.lower()]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


def mfu(flops_per_token: float, tokens_per_second: float, num_devices: int, device_kind: str) -> float | None:
  """Model FLOPs utilisation: achieved training FLOP/s over the devices' summed peak; None when unknown."""
  peak = peak_flops(device_kind)
  if peak is None:
    return None
  return flops_per_token * tokens_per_second / (peak * num_devices)
