"""GeGLU in Triton with a hand-written backward (the fast path of ``kernels.geglu`` on CUDA tensors).

Forward: the GELU of ``gate`` in fp32, rounded to the gate's dtype (as ``F.gelu`` returns it), times ``up``,
rounded once to the output dtype (the reference's order). The backward saves only ``gate`` and ``up`` and
recomputes the GELU and its derivative in fp32.

- exact:  gelu(x) = x/2 (1 + erf(x/sqrt 2)),  gelu'(x) = Phi(x) + x phi(x)   (torch's formulas)
- tanh:   0.5 x (1 + tanh(z)), z = sqrt(2/pi) (x + 0.044715 x^3), evaluated as x * sigmoid(2z) (the same
  function: 1 + tanh(z) = 2 sigmoid(2z)), which needs no tanh and does not cancel for negative x;
  gelu'(x) = s + 2 x s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 x^2), s = sigmoid(2z).

Inputs are viewed as [rows, columns] with a unit column stride (slices of a fused projection run without
a copy); row offsets are int64. The host side (views, launch sizes) is SwiGLU's (``swiglu_triton``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .swiglu_triton import check_same_shape, launch_gated_backward, launch_gated_forward

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
_SQRT_2_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_KAPPA = tl.constexpr(0.044715)


@triton.jit
def _gelu_and_grad(x, TANH: tl.constexpr, NEED_GRAD: tl.constexpr):
    """(gelu(x), gelu'(x)) in fp32; the derivative is 0 unless NEED_GRAD."""
    if TANH:
        inner = _SQRT_2_PI * (x + _KAPPA * x * x * x)
        s = 1.0 / (1.0 + tl.exp(-2.0 * inner))
        y = x * s
        if NEED_GRAD:
            d = s + 2.0 * x * s * (1.0 - s) * (_SQRT_2_PI * (1.0 + 3.0 * _KAPPA * x * x))
        else:
            d = 0.0
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2))
        y = x * cdf
        if NEED_GRAD:
            d = cdf + x * (_INV_SQRT_2PI * tl.exp(-0.5 * x * x))
        else:
            d = 0.0
    return y, d


@triton.jit
def _geglu_fwd_kernel(Y, G, U, stride_y, stride_g, stride_u, n_cols, TANH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    act, _ = _gelu_and_grad(g, TANH, False)
    act = act.to(G.dtype.element_ty).to(tl.float32)  # F.gelu returns the gate's dtype
    tl.store(Y + row * stride_y + cols, (act * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(
    DG, DU, DY, G, U,
    stride_dg, stride_du, stride_dy, stride_g, stride_u, n_cols,
    TANH: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    act, dact = _gelu_and_grad(g, TANH, True)
    du = dy * act.to(G.dtype.element_ty).to(tl.float32)  # y = round(gelu(g)) * u
    dg = dy * u * dact
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)


class GeGLUFunction(torch.autograd.Function):
    """``gelu(gate) * up`` with the Triton forward and a recomputing backward; ``apply(gate, up, approximate[,
    inplace])``: ``inplace``, the backward writes the gradients over the saved gate and up (see ``kernels.swiglu``)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, approximate: str = "none",
                inplace: bool = False) -> torch.Tensor:
        check_same_shape(gate, up, "geglu")
        if approximate not in ("none", "tanh"):
            raise ValueError(f"geglu: approximate={approximate!r}, expected 'none' or 'tanh'")
        y, g2, u2 = launch_gated_forward(_geglu_fwd_kernel, gate, up, TANH=approximate == "tanh")
        ctx.save_for_backward(g2, u2)
        ctx.shape, ctx.tanh, ctx.inplace = gate.shape, approximate == "tanh", inplace
        return y.view(gate.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        dg, du = launch_gated_backward(_geglu_bwd_kernel, *ctx.saved_tensors, dy, inplace=ctx.inplace, TANH=ctx.tanh)
        return dg.view(ctx.shape), du.view(ctx.shape), None, None
