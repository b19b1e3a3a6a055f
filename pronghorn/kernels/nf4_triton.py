"""NF4 dequantization in Triton (the fast path of ``NF4Weight.dequantize`` on CUDA tensors).

One program expands ``ROWS`` whole NF4 blocks laid out as a ``[ROWS, blocksize / 2]`` tile of packed bytes: the
bytes are read with contiguous (vectorizable) loads, each block's absmax is computed once per row and broadcast,
the high (first) and low (second) nibble values are interleaved with ``tl.join`` and written as one contiguous
``[ROWS, blocksize]`` tile, so loads and stores are both coalesced. (The first version, one lane per byte writing
the two values with two stride-2 stores and one absmax gather per byte, ran at 0.217 ms on a 14336 x 4096
projection on the H100 against bitsandbytes' 0.149 ms.)

The absmax under double quantization is ``nested_map[q_absmax] * nested_absmax + offset``. Arithmetic is fp32 in
bitsandbytes' order, with FMA contraction switched off (``enable_fp_fusion=False``) so ``a * b + c`` rounds
twice, as the PyTorch reference does: the result equals ``dequantize_nf4_reference`` bit for bit in every
output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4 import NF4Weight, dequantize_nf4_reference

VALUES_PER_PROGRAM = 4096  # default tile: ROWS = VALUES_PER_PROGRAM // blocksize NF4 blocks
NUM_WARPS = 4


@triton.jit
def _nf4_dequant_kernel(
    OUT, PACKED, CODE, ABSMAX, NESTED_MAP, NESTED_ABSMAX, OFFSET,
    n, nested_blocksize,
    DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS] NF4 block indices
    byte = block[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [ROWS, HALF]
    byte_mask = byte < (n + 1) // 2
    block_mask = block * BLOCKSIZE < n
    packed = tl.load(PACKED + byte, mask=byte_mask, other=0).to(tl.int32)
    if DOUBLE_QUANT:
        qa = tl.load(ABSMAX + block, mask=block_mask, other=0).to(tl.int32)
        scale = tl.load(NESTED_ABSMAX + block // nested_blocksize, mask=block_mask, other=0.0)
        absmax = tl.load(NESTED_MAP + qa, mask=block_mask, other=0.0) * scale + tl.load(OFFSET)
    else:
        absmax = tl.load(ABSMAX + block, mask=block_mask, other=0.0)
    hi = tl.load(CODE + (packed >> 4)) * absmax[:, None]  # nibble indices are 0..15: always in the table
    lo = tl.load(CODE + (packed & 15)) * absmax[:, None]
    values = tl.reshape(tl.join(hi, lo), (ROWS, BLOCKSIZE))  # [ROWS, HALF, 2] -> hi, lo, hi, lo, ... per block
    idx = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(OUT + idx, values.to(OUT.dtype.element_ty), mask=idx < n)


def _is_power_of_two(x: int) -> bool:
    return x >= 2 and x & (x - 1) == 0


def dequantize_nf4_triton(w: NF4Weight, dtype: torch.dtype | None = None, values_per_program: int | None = None,
                          num_warps: int | None = None) -> torch.Tensor:
    """``values_per_program`` and ``num_warps`` override the tile (for the benchmark's sweep)."""
    dtype = dtype or w.dtype
    if not _is_power_of_two(w.blocksize):  # bitsandbytes' blocksizes are powers of two; others: the reference
        return dequantize_nf4_reference(w, dtype)
    n = w.numel()
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    if n == 0:
        return out
    f32 = torch.float32
    code = w.quant_map.view(f32)
    if w.double_quant:
        args = (w.absmax, w.nested_quant_map.view(f32), w.nested_absmax.view(f32), w.offset.view(f32))
    else:
        args = (w.absmax.view(f32), code, code, code)  # unused pointers
    rows = max(1, (values_per_program or VALUES_PER_PROGRAM) // w.blocksize)
    grid = (triton.cdiv(triton.cdiv(n, w.blocksize), rows),)
    _nf4_dequant_kernel[grid](
        out, w.packed, code, *args, n, w.nested_blocksize,
        DOUBLE_QUANT=w.double_quant, BLOCKSIZE=w.blocksize, ROWS=rows, num_warps=num_warps or NUM_WARPS,
        enable_fp_fusion=False,
    )
    return out
