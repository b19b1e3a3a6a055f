"""SwiGLU in Triton with a hand-written backward (the fast path of ``kernels.swiglu`` on CUDA tensors).

Forward: ``silu(gate)`` in fp32, rounded to the gate's dtype (as ``F.silu`` returns it), times ``up``, rounded
once to the output dtype: the reference's order, so bf16 outputs match it bit for bit up to the last bit of
``exp``. The backward saves nothing but ``gate`` and ``up`` and recomputes the sigmoid from them, in fp32.

Inputs are viewed as [rows, columns] with a unit column stride, so slices of a fused gate/up projection
(``gu[..., :I]``, ``gu[..., I:]``) run without a copy; row offsets are int64. That host side (the views, launch
sizes and output buffers) is shared with ``geglu_triton``: ``launch_gated_forward`` / ``launch_gated_backward``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .triton_support import as_rows, elementwise_launch

_MAX_BLOCK = 2048


@triton.jit
def _swiglu_fwd_kernel(Y, G, U, stride_y, stride_g, stride_u, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(G.dtype.element_ty).to(tl.float32)  # F.silu's formula and rounding
    tl.store(Y + row * stride_y + cols, (act * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DG, DU, DY, G, U,
    stride_dg, stride_du, stride_dy, stride_g, stride_u, n_cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    denom = 1.0 + tl.exp(-g)
    sig = 1.0 / denom
    act = (g / denom).to(G.dtype.element_ty).to(tl.float32)  # the forward's rounded silu
    du = dy * act
    dg = dy * u * (sig * (1.0 + g * (1.0 - sig)))  # silu'(g) = sig * (1 + g * (1 - sig))
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)


def check_same_shape(gate: torch.Tensor, up: torch.Tensor, name: str) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"{name}: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")


def launch_gated_forward(kernel, gate: torch.Tensor, up: torch.Tensor, **constexprs):
    """``act(gate) * up`` by a forward ``kernel(Y, G, U, stride_y, stride_g, stride_u, n_cols, ..., BLOCK)`` over
    [rows, columns] views (shared with ``geglu_triton``; ``constexprs``: the kernel's own). Returns (y [rows,
    columns] in the promoted dtype, gate rows, up rows)."""
    g2, u2 = as_rows(gate), as_rows(up)
    y = torch.empty(g2.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if y.numel():
        grid, block, warps = elementwise_launch(*g2.shape, max_block=_MAX_BLOCK)
        kernel[grid](
            y, g2, u2, y.stride(0), g2.stride(0), u2.stride(0), g2.shape[1], **constexprs, BLOCK=block, num_warps=warps
        )
    return y, g2, u2


def launch_gated_backward(kernel, g2: torch.Tensor, u2: torch.Tensor, dy: torch.Tensor, inplace: bool = False,
                          **constexprs):
    """(d gate, d up) as [rows, columns] by a backward ``kernel(DG, DU, DY, G, U, their row strides, n_cols, ...,
    BLOCK)`` from the saved gate and up rows (shared with ``geglu_triton``). ``inplace``: written over the saved
    gate and up (each element is read before it is written, by the same program), which the caller owns; their
    version counters are bumped, so any other holder of them fails loudly instead of reading gradients."""
    dy2 = as_rows(dy)
    if inplace:
        dg, du = g2, u2
        for t in (g2, u2):
            torch.autograd.graph.increment_version(t)
    else:
        dg = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
        du = torch.empty(u2.shape, dtype=u2.dtype, device=u2.device)
    if dg.numel():
        grid, block, warps = elementwise_launch(*g2.shape, max_block=_MAX_BLOCK)
        kernel[grid](
            dg, du, dy2, g2, u2,
            dg.stride(0), du.stride(0), dy2.stride(0), g2.stride(0), u2.stride(0), g2.shape[1],
            **constexprs, BLOCK=block, num_warps=warps,
        )
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up`` with the Triton forward and a recomputing backward; ``apply(gate, up[, inplace])``:
    ``inplace``, the backward writes the gradients over the saved gate and up (see ``kernels.swiglu``)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        check_same_shape(gate, up, "swiglu")
        y, g2, u2 = launch_gated_forward(_swiglu_fwd_kernel, gate, up)
        ctx.save_for_backward(g2, u2)
        ctx.shape, ctx.inplace = gate.shape, inplace
        return y.view(gate.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        dg, du = launch_gated_backward(_swiglu_bwd_kernel, *ctx.saved_tensors, dy, inplace=ctx.inplace)
        return dg.view(ctx.shape), du.view(ctx.shape), None
