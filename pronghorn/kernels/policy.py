"""The kernel policy: which implementation every op takes and the numerics of the LoRA ops, a plain object the
model's layers hold (``kernel_policy``, set on all of them by ``DecoderForCausalLM.set_kernel_policy``).

``reference=True``: every op takes its plain PyTorch reference on any device (the oracle a fast path is tested
against, e.g. a whole training run); otherwise CUDA tensors take the Triton kernels (``triton_support.use_triton``).

``adapter_math`` decides in which dtype an adapter computes on a frozen 16-bit base:

- ``"base"`` (the default): on a bf16 base (a bf16 weight, or NF4 with bf16 compute) the adapter's matmuls run
  in bf16 with or without ``torch.autocast``: the same kernels, the same numbers and the same speed as under
  ``torch.autocast("cuda", torch.bfloat16)``, which is how PEFT trains with HF Trainer's ``bf16=True`` (and how
  Unsloth computes its adapters). A plain loop without autocast is then as fast as one with it. fp16 bases
  keep the adapter's own dtype without autocast (fp16 adapter gradients would underflow with no GradScaler).
- ``"adapter"``: PEFT's numerics without autocast: the adapter computes in its own dtype (fp32 adapters on a
  bf16 base: the delta in fp32, cast back), at the cost of fp32 [tokens, out] temporaries in every projection.

Under autocast both are autocast's dtype, exactly as PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PronghornError

ADAPTER_MATH = ("base", "adapter")


@dataclass(frozen=True)
class KernelPolicy:
    adapter_math: str = "base"
    reference: bool = False

    def __post_init__(self):
        if self.adapter_math not in ADAPTER_MATH:
            raise PronghornError(f"adapter_math must be one of {ADAPTER_MATH}, got {self.adapter_math!r}")

    def compute_dtype(self, x: torch.Tensor, weight) -> torch.dtype | None:
        """The dtype the LoRA op's matmuls run in for input ``x`` on base ``weight`` (a tensor or an NF4 weight
        with a ``dtype``), or None: each operand in its own dtype (PEFT without autocast)."""
        device = x.device.type
        if device in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        if self.adapter_math == "base" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16:
            return torch.bfloat16
        return None


DEFAULT_POLICY = KernelPolicy()
