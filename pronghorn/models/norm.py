"""RMSNorm as a module (HF parameter name ``weight``); the math lives in ``kernels.rms_norm``."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
