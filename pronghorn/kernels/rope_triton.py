"""RoPE on q and k together as one Triton kernel, with the inverse rotation as its backward.

Layout: the half-split ("rotate_half") form of HF checkpoints. With ``x = [x1, x2]`` and ``cos = [c1, c2]``,
``sin = [s1, s2]`` split at ``D // 2``::

    y1 = x1 * c1 - x2 * s1          dx1 = dy1 * c1 + dy2 * s2
    y2 = x2 * c2 + x1 * s2          dx2 = dy2 * c2 - dy1 * s1

The backward is the forward kernel with ``sin`` negated and its halves swapped (``s1' = -s2, s2' = -s1``),
i.e. the inverse rotation; for the tables ``rope_cos_sin`` builds (``c1 == c2``, ``s1 == s2``) that is
plainly "rotate by -theta". Both halves of cos/sin are read, so the result equals the reference for any
cos/sin, not only for tables of that form.

One program per (batch row, token) rotates every head of q and of k at that token (looping over head
blocks), so cos/sin are loaded once and reused across heads; explicit per-row positions (packed
sequences) come for free from reading ``cos``/``sin`` at ``[b, t]`` (or ``[0, t]`` when broadcast).
Every tensor is addressed through its own strides with int64 offsets, so the ``[B, T, H, D] ->
[B, H, T, D]`` transposed views the attention layer passes need no copy. Math is fp32; results are cast
to the output dtype once.

Not in place: forward writes fresh outputs laid out like q and k (``empty_like`` keeps the transposed
memory order, as the reference's elementwise ops do), and backward writes fresh dq, dk. Rotating q/k in
place would save one transient q/k-sized allocation but mutate the caller's tensors and need
``mark_dirty`` on views of autograd-tracked projections; the traffic (one read, one write) is the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 2048  # elements of one half-tile (heads x half-dim) held in registers per loop step


@triton.jit
def _rotate_heads(
    x_ptr, o_ptr, sxh, sxd, soh, sod, c1, c2, s1, s2,
    H: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rotate heads [0, H) of one token; x_ptr/o_ptr already point at that token's head 0, element 0."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HALF
    d64 = offs_d.to(tl.int64)
    xd1, xd2 = d64 * sxd, (d64 + HALF) * sxd
    od1, od2 = d64 * sod, (d64 + HALF) * sod
    c1, c2, s1, s2 = c1[None, :], c2[None, :], s1[None, :], s2[None, :]
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = (offs_h < H)[:, None] & mask_d[None, :]
        h64 = offs_h.to(tl.int64)[:, None]
        xh, oh = h64 * sxh, h64 * soh
        x1 = tl.load(x_ptr + xh + xd1[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + xh + xd2[None, :], mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
        tl.store(o_ptr + oh + od1[None, :], y1.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(o_ptr + oh + od2[None, :], y2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, T,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd,
    sqob, sqoh, sqot, sqod, skob, skoh, skot, skod,
    scb, sct, scd, ssb, sst, ssd,
    HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BACKWARD: tl.constexpr,
):
    # Head counts are compile-time constants (one specialisation per model): the head loop then has constant
    # bounds, which Triton 3.6's interpreter needs (a loop over a runtime bound fails there with numpy 2.x).
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HALF
    d64 = offs_d.to(tl.int64)
    cp = cos_ptr + b * scb + t * sct
    sp = sin_ptr + b * ssb + t * sst
    c1 = tl.load(cp + d64 * scd, mask=mask_d, other=0.0).to(tl.float32)
    c2 = tl.load(cp + (d64 + HALF) * scd, mask=mask_d, other=0.0).to(tl.float32)
    s1 = tl.load(sp + d64 * ssd, mask=mask_d, other=0.0).to(tl.float32)
    s2 = tl.load(sp + (d64 + HALF) * ssd, mask=mask_d, other=0.0).to(tl.float32)
    if BACKWARD:  # transpose of the rotation: negate sin and swap its halves
        s_first = -s2
        s2 = -s1
        s1 = s_first
    _rotate_heads(q_ptr + b * sqb + t * sqt, qo_ptr + b * sqob + t * sqot, sqh, sqd, sqoh, sqod,
                  c1, c2, s1, s2, HQ, HALF, BLOCK_HQ, BLOCK_D)
    _rotate_heads(k_ptr + b * skb + t * skt, ko_ptr + b * skob + t * skot, skh, skd, skoh, skod,
                  c1, c2, s1, s2, HK, HALF, BLOCK_HK, BLOCK_D)


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q and k must be [B, H, T, D], got q {tuple(q.shape)} and k {tuple(k.shape)}")
    (b, _, t, d), (bk, _, tk, dk) = q.shape, k.shape
    if (b, t, d) != (bk, tk, dk):
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, seq or head_dim")
    if d % 2:
        raise ValueError(f"rope: head_dim must be even, got {d}")
    for name, c in (("cos", cos), ("sin", sin)):
        if c.dim() != 3 or c.shape[0] not in (1, b) or tuple(c.shape[1:]) != (t, d):
            raise ValueError(f"rope: {name} must be [{b} or 1, {t}, {d}] for q {tuple(q.shape)}, "
                             f"got {tuple(c.shape)}")
    if not (q.device == k.device == cos.device == sin.device):
        raise ValueError(f"rope: q, k, cos and sin must share one device, got {q.device}, {k.device}, "
                         f"{cos.device}, {sin.device}")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _launch(x_q, x_k, o_q, o_k, cos, sin, backward: bool) -> None:
    b, hq, t, d = x_q.shape
    hk = x_k.shape[1]
    if b * t == 0:
        return
    half = d // 2
    block_d = _next_pow2(half)
    cap = max(1, _TILE // block_d)
    cs = (0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1), cos.stride(2))
    ss = (0 if sin.shape[0] == 1 else sin.stride(0), sin.stride(1), sin.stride(2))
    args = (x_q, x_k, o_q, o_k, cos, sin, t,
            *x_q.stride(), *x_k.stride(), *o_q.stride(), *o_k.stride(), *cs, *ss)
    meta = dict(HQ=hq, HK=hk, HALF=half, BLOCK_D=block_d, BLOCK_HQ=min(_next_pow2(hq), cap),
                BLOCK_HK=min(_next_pow2(hk), cap), BACKWARD=backward, num_warps=4)
    if x_q.is_cuda:
        with torch.cuda.device(x_q.device):
            _rope_kernel[(b * t,)](*args, **meta)
    else:  # CPU tensors: Triton's interpreter (TRITON_INTERPRET=1), used by the tests
        _rope_kernel[(b * t,)](*args, **meta)


class RoPEFunction(torch.autograd.Function):
    """``(q, k, cos, sin) -> (q_rot, k_rot)``; q [B, Hq, T, D], k [B, Hk, T, D] (any strides), cos/sin
    [B or 1, T, D]. Outputs have dtype ``promote(q.dtype, cos.dtype)`` (as the reference's arithmetic
    gives) and q's/k's memory layout. cos/sin get no gradient."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        _check(q, k, cos, sin)
        qo = torch.empty_like(q, dtype=torch.promote_types(q.dtype, cos.dtype))
        ko = torch.empty_like(k, dtype=torch.promote_types(k.dtype, cos.dtype))
        _launch(q, k, qo, ko, cos, sin, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        cos, sin = ctx.saved_tensors
        dq = torch.empty_like(dqo, dtype=ctx.dtypes[0])
        dk = torch.empty_like(dko, dtype=ctx.dtypes[1])
        _launch(dqo, dko, dq, dk, cos, sin, backward=True)
        return dq, dk, None, None


def apply_rope_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k through the Triton kernel (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    return RoPEFunction.apply(q, k, cos, sin)
