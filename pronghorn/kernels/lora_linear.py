"""Linear layer with an optional low-rank adapter: y = x W^T + b + s * dropout(x) A^T B^T."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Plain PyTorch LoRA linear. The adapter runs in its own dtype (as PEFT does) and is cast back."""
    y = F.linear(x, weight, bias)
    if lora_A is None:
        return y
    h = x.to(lora_A.dtype)
    if dropout and training:
        h = F.dropout(h, p=dropout, training=True)
    delta = F.linear(F.linear(h, lora_A), lora_B) * scaling
    return y + delta.to(y.dtype)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The single entry point model code calls for every projection (with or without an adapter)."""
    return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout, training)
