"""SwiGLU activation of the gated MLP: silu(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .policy import DEFAULT_POLICY, KernelPolicy
from .triton_support import use_triton


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, owns_inputs: bool = False,
           policy: KernelPolicy = DEFAULT_POLICY) -> torch.Tensor:
    """silu(gate) * up; the single entry point model code calls.

    CUDA tensors of one shape take the Triton kernel (its backward recomputes silu from gate and up);
    anything else takes the PyTorch reference. ``owns_inputs``: the caller promises that nothing else uses
    ``gate`` and ``up`` (fresh projection outputs), so the backward may write their gradients over them: two
    [tokens, intermediate] buffers less at the MLP's backward peak.
    """
    if gate.shape == up.shape and not policy.reference and use_triton(gate, up):
        from .swiglu_triton import SwiGLUFunction

        return SwiGLUFunction.apply(gate, up, owns_inputs)
    return swiglu_reference(gate, up)
