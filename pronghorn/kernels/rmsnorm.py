"""RMSNorm: y = w * x / sqrt(mean(x^2) + eps), normalised in fp32, as Hugging Face does each form: Llama's rounds the
normalised row to the input dtype and then scales it by ``w``; Gemma's (``offset=1.0``) scales the fp32 row by
``1 + w`` in fp32 and rounds once."""

from __future__ import annotations

import torch

from .policy import DEFAULT_POLICY, KernelPolicy
from .triton_support import use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """Plain PyTorch RMSNorm. ``offset=1.0`` gives the Gemma form ``(1 + w)`` (scaled in fp32, rounded once)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (h * (weight.float() + offset)).to(dtype)
    return weight * h.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             policy: KernelPolicy = DEFAULT_POLICY) -> torch.Tensor:
    """RMSNorm over the last dimension; the single entry point model code calls.

    CUDA tensors take the Triton kernel (hand-written backward, dW only when ``weight`` is trainable);
    anything else (or a reference ``policy``) takes the PyTorch reference.
    """
    if not policy.reference and use_triton(x, weight):
        from .rmsnorm_triton import RMSNormFunction

        return RMSNormFunction.apply(x, weight, eps, offset)
    return rms_norm_reference(x, weight, eps, offset)


def rms_norm_with_residual(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                           policy: KernelPolicy = DEFAULT_POLICY) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x), x)`` for a pre-norm block, ``x + f(normed)``: take the residual from here. On the Triton
    path the returned ``x`` is an alias whose gradient reaches the norm's backward, which adds it into dX as it
    writes it (no separate add of the two gradients); elsewhere it is ``x`` itself.

    16-bit inputs only: there the kernel's sum is autograd's bit for bit. In fp32 the GPU compiler contracts the
    kernel's last product and the add into one FMA, one rounding fewer than the unfused sum (on an H100 the fp32
    gradients differed in the last bit), so fp32 keeps the norm's own Function and autograd's add."""
    if not policy.reference and x.dtype in (torch.bfloat16, torch.float16) and use_triton(x, weight):
        from .rmsnorm_triton import ResidualRMSNormFunction

        return ResidualRMSNormFunction.apply(x, weight, eps, offset)
    return rms_norm(x, weight, eps, offset, policy), x
