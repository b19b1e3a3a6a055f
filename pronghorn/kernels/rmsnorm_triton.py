"""RMSNorm in Triton with a hand-written backward (the fast path of ``kernels.rms_norm`` on CUDA tensors).

Numerics follow ``rms_norm_reference`` step by step: the row is normalised in fp32; without an offset (Llama) the
normalised value is rounded to the input dtype and only then multiplied by the weight; with one (Gemma's
``1 + w``) the fp32 row is multiplied by ``weight + offset`` in fp32 and rounded once. So bf16 outputs equal the
reference's bit for bit up to the last bit of the fp32 sum of squares.
The forward saves one fp32 ``1/rms`` per row; the backward recomputes the normalised row
from it and returns dX always and dW only when the weight needs a gradient, from per-program fp32 partial
sums that torch reduces afterwards (no atomics, deterministic).

A pre-norm block's input feeds both its norm and its residual sum, so autograd adds two gradients into it: the
norm's dX and the block output's gradient (an add kernel over [tokens, hidden] per block, two per layer).
:class:`ResidualRMSNormFunction` hands the input back as the residual's operand, so both gradients reach its one
backward, whose kernel adds the residual's in as it writes dX: two passes over [tokens, hidden] fewer per block.
It rounds dX to its dtype before the add, then adds in fp32 and rounds, as torch's add of the two does: for
bf16 and fp16 the sum is the unfused one bit for bit. Not for fp32, where nothing separates the last product from
the add and the GPU compiler fuses them into one FMA (one rounding fewer: ``kernels.rms_norm_with_residual``
takes this path for 16-bit inputs only).

Rows are tiles of ``ROWS x BLOCK`` (several short rows per program, one long row); row offsets are int64, so
``row * stride`` may exceed 2^31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .triton_support import row_block

_TILE = 4096  # elements a program holds per tile: short rows are packed several to a tile
# Backward programs per multiprocessor when dW is needed (each writes one fp32 partial dW row). On an H100,
# 2 to 8 gave the same 2.3-2.5 TB/s at 16384 x 4096 bf16 (no dW: 2.9 TB/s); 2 was marginally best.
_DW_PROGRAMS_PER_SM = 2


@triton.jit
def _weight_f32(W, cols, col_mask, offset):
    """The scale in fp32: ``weight + offset`` (no rounding in between)."""
    w = tl.load(W + cols, mask=col_mask, other=0.0)
    return w.to(tl.float32) + offset


@triton.jit
def _as_scaled(normed, X, OFFSET: tl.constexpr):
    """The normalised row as the scale multiplies it: rounded to the input dtype (Llama) or fp32 (an offset)."""
    if OFFSET:
        return normed
    return normed.to(X.dtype.element_ty).to(tl.float32)


@triton.jit
def _rms_norm_fwd_kernel(
    Y, X, W, RSTD,
    stride_y, stride_x, n_rows, n_cols, eps, offset,
    OFFSET: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    r64 = rows.to(tl.int64)[:, None]

    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = _weight_f32(W, cols, col_mask, offset)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / n_cols + eps)
    normed = _as_scaled(x * rstd[:, None], X, OFFSET)  # HF's order: Llama casts, then scales
    tl.store(Y + r64 * stride_y + cols[None, :], (w[None, :] * normed).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DX, DW_PARTIAL, DY, X, W, RSTD, DRES,
    stride_dx, stride_dy, stride_x, stride_dres, n_rows, n_cols, offset,
    OFFSET: tl.constexpr, HAS_DW: tl.constexpr, HAS_DRES: tl.constexpr, TILES: tl.constexpr, ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    first_row = pid * (TILES * ROWS)  # each program owns TILES whole tiles of ROWS rows
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = _weight_f32(W, cols, col_mask, offset)
    dw = tl.zeros([BLOCK], dtype=tl.float32)

    for tile in range(TILES):
        rows = first_row + tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)

        normed = x * rstd[:, None]
        dnormed = dy * w[None, :]
        # d/dx of x * rstd(x):  rstd * (dn - n * mean(dn * n))
        dot = tl.sum(dnormed * normed, axis=1) / n_cols
        dx = rstd[:, None] * (dnormed - normed * dot[:, None])
        if HAS_DRES:  # the residual's gradient, added as torch adds two gradients of dX's dtype
            dres = tl.load(DRES + r64 * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dx = dx.to(DX.dtype.element_ty).to(tl.float32) + dres
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:  # y = w * n: dW sums dy times the normalised value as the forward scaled it
            dw += tl.sum(dy * _as_scaled(normed, X, OFFSET), axis=0)

    if HAS_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=col_mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A [rows, last dim] view (a copy only when the last dimension is not unit-stride)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _tile(n_cols: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps): short rows share a program, a long row has one to itself."""
    block, _ = row_block(n_cols)
    rows = max(1, _TILE // block)
    return rows, block, row_block(rows * block)[1]


def _dw_programs(device: torch.device) -> int:
    """How many programs (hence fp32 partial dW rows) the backward uses when dW is needed."""
    if device.type == "cuda":
        return _DW_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: few programs, so tests also cover one program looping over several tiles


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0):
    """(y, x as rows, rstd): the forward pass without autograd."""
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(
            f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({n_cols},) for input {tuple(x.shape)}"
        )
    x2 = _rows(x)
    n_rows = x2.shape[0]
    out_dtype = x.dtype if offset else torch.promote_types(x.dtype, weight.dtype)  # as the reference
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        rows, block, warps = _tile(n_cols)
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, rows),)](
            y, x2, weight, rstd, y.stride(0), x2.stride(0), n_rows, n_cols, eps, offset,
            OFFSET=bool(offset), ROWS=rows, BLOCK=block, num_warps=warps,
        )
    return y.view(x.shape), x2, rstd


def rms_norm_backward(dy, x2, weight, rstd, offset: float, need_dw: bool, dres: torch.Tensor | None = None):
    """(dx as rows, dw or None) from the upstream gradient and what the forward saved; ``dres``: a gradient of
    the input's shape and dtype that dx gets added (the residual's, ``ResidualRMSNormFunction``)."""
    n_rows, n_cols = x2.shape
    dy2 = _rows(dy)
    dres2 = dy2 if dres is None else _rows(dres)  # without one: a placeholder the kernel does not read
    if dres is not None and (dres2.shape != x2.shape or dres.dtype != x2.dtype):
        raise ValueError(f"rms_norm_backward: the residual's gradient is {tuple(dres.shape)} {dres.dtype}, "
                         f"expected the input's {tuple(x2.shape)} {x2.dtype}")
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    if n_rows == 0:
        return dx, torch.zeros_like(weight) if need_dw else None
    rows, block, warps = _tile(n_cols)
    programs = min(n_rows, _dw_programs(x2.device)) if need_dw else triton.cdiv(n_rows, rows)
    # Tiles per program as a power of two: a compile-time trip count with few variants to compile (a runtime
    # loop bound would also break the interpreter under numpy >= 2.4, which cannot index a 1-element array).
    tiles = triton.next_power_of_2(triton.cdiv(triton.cdiv(n_rows, programs), rows))
    programs = triton.cdiv(n_rows, tiles * rows)
    partial = torch.empty((programs, n_cols) if need_dw else (1,), dtype=torch.float32, device=x2.device)
    _rms_norm_bwd_kernel[(programs,)](
        dx, partial, dy2, x2, weight, rstd, dres2,
        dx.stride(0), dy2.stride(0), x2.stride(0), dres2.stride(0), n_rows, n_cols, offset,
        OFFSET=bool(offset), HAS_DW=need_dw, HAS_DRES=dres is not None, TILES=tiles, ROWS=rows, BLOCK=block,
        num_warps=warps,
    )
    return dx, partial.sum(0).to(weight.dtype) if need_dw else None


class RMSNormFunction(torch.autograd.Function):
    """``rms_norm`` with the Triton forward and backward; ``apply(x, weight, eps, offset)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
        weight = weight.contiguous()
        y, x2, rstd = rms_norm_forward(x, weight, float(eps), float(offset))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.x_shape = float(offset), x.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x2, weight, rstd, ctx.offset, ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None, None


class ResidualRMSNormFunction(torch.autograd.Function):
    """``(rms_norm(x), x)``: the norm and its input handed back for the block's residual sum, so the backward
    gets both gradients and writes their sum as dX in one kernel; ``apply(x, weight, eps, offset)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0):
        weight = weight.contiguous()
        y, x2, rstd = rms_norm_forward(x, weight, float(eps), float(offset))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.x_shape = float(offset), x.shape
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to add
        return y, x  # x as is: autograd hands the residual an alias whose gradient comes back here

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor | None, dres: torch.Tensor | None):
        x2, weight, rstd = ctx.saved_tensors
        if dy is None:  # the norm's output took no part in the loss: dX is the residual's alone
            return (dres if ctx.needs_input_grad[0] else None), None, None, None
        dx, dw = rms_norm_backward(dy, x2, weight, rstd, ctx.offset, ctx.needs_input_grad[1], dres)
        return (dx.view(ctx.x_shape) if ctx.needs_input_grad[0] else None), dw, None, None
