"""Which floating-point type a model computes in on a device, and the families float16 cannot hold.

- :func:`is_bfloat16_supported` (Unsloth's name, for ``SFTConfig(bf16=is_bfloat16_supported(),
  fp16=not is_bfloat16_supported())``): whether the GPU computes bfloat16 natively (compute capability 8.0 and
  later, or ROCm). ``torch.cuda.is_bf16_supported()`` also says yes for a T4 or a V100, where bfloat16 is only
  emulated: slow, and Triton's matmuls need compute capability 8.0 for it. Those GPUs compute in float16.
- :func:`default_dtype`: bfloat16 on such a GPU, float16 on an older one, float32 on the CPU. A family whose
  published weights drive activations past float16's largest value (65,504) computes in float32 where the GPU
  has no bfloat16 (``FamilySpec.fp16_overflows``: Gemma 3, whose RMSNorm scales and gate projections overflow
  float16 and give NaN losses and empty generations on a T4).
- :func:`fp16_autocast_refused`: a forward of such a family in float32 weights under
  ``torch.autocast(dtype=torch.float16)`` (what HF Trainer and TRL do with ``fp16=True``) runs in float32
  instead, as its weights are: the result float32 would give, where float16 would give NaN.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .families import FAMILIES

FP16_MAX = float(torch.finfo(torch.float16).max)


def is_bfloat16_supported(device: torch.device | str | None = None) -> bool:
    """Whether ``device`` (default: the current CUDA device) computes bfloat16 natively. False on the CPU, where
    pronghorn computes in float32, and without a GPU."""
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8


def overflows_fp16(model_type: str | None) -> bool:
    spec = FAMILIES.get(model_type or "")
    return bool(spec and spec.fp16_overflows)


def default_dtype(device: torch.device | str, model_type: str | None = None) -> torch.dtype:
    """bf16 on a GPU that has it; else fp16, or fp32 for a family whose activations overflow fp16; fp32 on the
    CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    if is_bfloat16_supported(device):
        return torch.bfloat16
    if overflows_fp16(model_type):
        print(f"pronghorn: {model_type}'s activations exceed float16's range ({FP16_MAX:,.0f}) and this GPU has no "
              "bfloat16: the model computes in float32 (dtype=torch.float16 forces float16)", flush=True)
        return torch.float32
    return torch.float16


def warn_if_fp16_overflows(model_type: str | None, dtype: torch.dtype, source: str) -> None:
    if dtype == torch.float16 and overflows_fp16(model_type):
        warnings.warn(f"{source}: {model_type} in float16: its activations exceed float16's range "
                      f"({FP16_MAX:,.0f}), which gives inf and NaN (losses, empty generations); load it in "
                      "bfloat16 where the GPU has it, else in float32 (dtype=None picks)", stacklevel=3)


def leaves_fp16_autocast(forward):
    """A causal LM's ``forward`` that runs with autocast off where :func:`fp16_autocast_refused` (the signature
    stays ``forward``'s: HF Trainer reads it)."""

    @functools.wraps(forward)
    def run(model, *args, **kwargs):
        if not overflows_fp16(model.config.model_type):  # every other family: one dict lookup a forward
            return forward(model, *args, **kwargs)
        device = model.device.type
        if not fp16_autocast_refused(model.config.model_type, model.dtype, device):
            return forward(model, *args, **kwargs)
        if not model.__dict__.get("_fp16_autocast_noted"):
            model.__dict__["_fp16_autocast_noted"] = True
            print(f"pronghorn: {model.config.model_type} overflows float16: its forward runs in float32, its weights' "
                  "dtype, under torch.autocast(dtype=torch.float16) (a Trainer with fp16=True)", flush=True)
        with torch.autocast(device, enabled=False):
            return forward(model, *args, **kwargs)

    return run


def fp16_autocast_refused(model_type: str | None, weight_dtype: torch.dtype, device_type: str) -> bool:
    """Whether a forward should leave fp16 autocast: a family that overflows fp16, weights in fp32, autocast on
    ``device_type`` in fp16."""
    return (weight_dtype == torch.float32 and overflows_fp16(model_type)
            and torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16)
