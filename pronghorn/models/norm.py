"""RMSNorm as a module (HF parameter name ``weight``); the math lives in ``kernels.rms_norm``."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import rms_norm, rms_norm_with_residual
from ..kernels.policy import DEFAULT_POLICY, KernelPolicy


class RMSNorm(nn.Module):
    """``offset``: the norm scales by ``offset + weight`` (1.0: Gemma's ``(1 + w)``, whose weights start at 0)."""

    kernel_policy: KernelPolicy = DEFAULT_POLICY  # kernels/policy.py; DecoderForCausalLM.set_kernel_policy

    def __init__(self, dim: int, eps: float, offset: float = 0.0, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset, self.kernel_policy)

    def with_residual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(x), x)`` for a pre-norm block: its residual sum takes this ``x``, so the two gradients into
        ``x`` are summed in the norm's backward (kernels.rms_norm_with_residual)."""
        return rms_norm_with_residual(x, self.weight, self.eps, self.offset, self.kernel_policy)
