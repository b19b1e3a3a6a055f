"""GeGLU activation of the gated MLP (Gemma's): gelu(gate) * up, with the exact (erf) or the tanh GELU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .policy import DEFAULT_POLICY, KernelPolicy
from .triton_support import use_triton

APPROXIMATIONS = ("none", "tanh")


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Plain PyTorch GeGLU: ``F.gelu(gate, approximate=approximate) * up`` (HF's ``gelu`` / ``gelu_pytorch_tanh``)."""
    return F.gelu(gate, approximate=approximate) * up


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none",
          policy: KernelPolicy = DEFAULT_POLICY, owns_inputs: bool = False) -> torch.Tensor:
    """gelu(gate) * up; the single entry point model code calls.

    ``approximate`` is ``"none"`` (exact, erf) or ``"tanh"``. CUDA tensors of one shape take the Triton
    kernel (its backward recomputes the GELU from gate and up); anything else takes the PyTorch reference.
    ``owns_inputs``: as ``swiglu``'s, the backward may write the gradients over ``gate`` and ``up``.
    """
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"geglu: approximate={approximate!r}, expected one of {APPROXIMATIONS}")
    if gate.shape == up.shape and not policy.reference and use_triton(gate, up):
        from .geglu_triton import GeGLUFunction

        return GeGLUFunction.apply(gate, up, approximate, owns_inputs)
    return geglu_reference(gate, up, approximate)
