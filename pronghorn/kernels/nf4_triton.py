"""NF4 dequantization in Triton (the fast path of ``NF4Weight.dequantize`` on CUDA tensors).

One program expands ``BLOCK`` packed bytes (2 * BLOCK values). Per value: the NF4 level from the nibble (high
nibble first), times the block's absmax, which double quantization stores as
``nested_map[q_absmax] * nested_absmax + offset``. Arithmetic is fp32 in bitsandbytes' order, with FMA
contraction switched off (``enable_fp_fusion=False``) so ``a * b + c`` rounds twice, as the PyTorch reference
does: the result equals ``dequantize_nf4_reference`` bit for bit in every output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4 import NF4Weight

_BLOCK = 1024  # packed bytes per program (2048 output values)


@triton.jit
def _nf4_dequant_kernel(
    OUT, PACKED, CODE, ABSMAX, NESTED_MAP, NESTED_ABSMAX, OFFSET,
    n, blocksize, nested_blocksize,
    DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr,
):
    byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    byte_mask = byte < (n + 1) // 2
    packed = tl.load(PACKED + byte, mask=byte_mask, other=0).to(tl.int32)
    hi_idx = 2 * byte
    lo_idx = hi_idx + 1
    # Both values of a byte lie in the same NF4 block (blocksize is even).
    block = hi_idx // blocksize
    if DOUBLE_QUANT:
        qa = tl.load(ABSMAX + block, mask=byte_mask, other=0).to(tl.int32)
        scale = tl.load(NESTED_ABSMAX + block // nested_blocksize, mask=byte_mask, other=0.0)
        absmax = tl.load(NESTED_MAP + qa, mask=byte_mask, other=0.0) * scale + tl.load(OFFSET)
    else:
        absmax = tl.load(ABSMAX + block, mask=byte_mask, other=0.0)
    hi = tl.load(CODE + (packed >> 4), mask=byte_mask, other=0.0) * absmax
    lo = tl.load(CODE + (packed & 15), mask=byte_mask, other=0.0) * absmax
    out_ty = OUT.dtype.element_ty
    tl.store(OUT + hi_idx, hi.to(out_ty), mask=byte_mask)
    tl.store(OUT + lo_idx, lo.to(out_ty), mask=byte_mask & (lo_idx < n))


def dequantize_nf4_triton(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    if w.blocksize % 2:
        raise ValueError(f"NF4 blocksize must be even, got {w.blocksize}")
    n = w.numel()
    out = torch.empty(w.shape, dtype=dtype or w.dtype, device=w.device)
    if n == 0:
        return out
    f32 = torch.float32
    code = w.quant_map.view(f32)
    if w.double_quant:
        args = (w.absmax, w.nested_quant_map.view(f32), w.nested_absmax.view(f32), w.offset.view(f32))
    else:
        args = (w.absmax.view(f32), code, code, code)  # unused pointers
    grid = (triton.cdiv((n + 1) // 2, _BLOCK),)
    _nf4_dequant_kernel[grid](
        out, w.packed, code, *args, n, w.blocksize, w.nested_blocksize,
        DOUBLE_QUANT=w.double_quant, BLOCK=_BLOCK, num_warps=4, enable_fp_fusion=False,
    )
    return out
