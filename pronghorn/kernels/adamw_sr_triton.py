"""The AdamW step with stochastic rounding (kernels/adamw_sr.py) as one Triton pass: each element's weight (bf16),
gradient, and fp32 moments read once and written once (22 bytes per element for a bf16 gradient), instead of
a dozen PyTorch passes. The arithmetic is the reference's, operation by operation, with FMA contraction off
(``enable_fp_fusion=False``), correctly rounded square root and division, and the same integer hash for the
rounding noise (bf16 moments: rounded the same way, with their own keys; 14 bytes per element): the result
equals :func:`~pronghorn.kernels.adamw_sr.adamw_sr_step_reference` bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adamw_sr import moment_keys

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _rounded_bf16(value, offs, key):
    """``value`` (fp32) stochastically rounded to bf16 with the reference's noise for ``offs`` and ``key``."""
    x = (offs & 0xFFFFFFFF) * 0x27D4EB2F + key  # the reference's hash, in int64 without overflow
    x = x & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    bits = (value.to(tl.int32, bitcast=True) + (x >> 16).to(tl.int32)) & -65536
    return tl.where(value != value, value, bits.to(tl.float32, bitcast=True)).to(tl.bfloat16)


@triton.jit
def _adamw_sr_kernel(W, G, M, V, n, key, key_m, key_v, decay, w1, beta2, w2, bias2_sqrt, eps, neg_step,
                     BF16_MOMENTS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32) * decay
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
    m = m + (g - m) * w1
    v = v * beta2 + (g * g) * w2
    w = w + tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps) * neg_step
    tl.store(W + offs, _rounded_bf16(w, offs, key), mask=mask)
    if BF16_MOMENTS:
        tl.store(M + offs, _rounded_bf16(m, offs, key_m), mask=mask)
        tl.store(V + offs, _rounded_bf16(v, offs, key_v), mask=mask)
    else:
        tl.store(M + offs, m, mask=mask)
        tl.store(V + offs, v, mask=mask)


def adamw_sr_step_triton(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                         key: int, constants: tuple[float, ...]) -> None:
    n = weight.numel()
    if n == 0:
        return
    key_m, key_v = moment_keys(key)
    _adamw_sr_kernel[(triton.cdiv(n, BLOCK),)](weight, grad, exp_avg, exp_avg_sq, n, key & 0x7FFFFFFF, key_m, key_v,
                                               *constants, BF16_MOMENTS=exp_avg.dtype == torch.bfloat16,
                                               BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)
