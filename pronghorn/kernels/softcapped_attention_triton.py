"""Soft-capped attention in Triton, FlashAttention-2 style (the fast path of ``kernels.softcapped_attention``).

Per query row i and key j (scores in fp32, ``c`` the soft-cap):

    s_ij = scale * q_i . k_j,   t_ij = tanh(s_ij / c),   z_ij = c * t_ij  (or -inf where j is not visible)
    P = softmax_j(z),   O = P V,   lse_i = log sum_j exp(z_ij)

Forward: one program per (query block, batch, query head) walks the visible key blocks with an online softmax
(running max m, running sum l, the accumulator rescaled by exp(m_old - m_new)) and saves ``lse`` (fp32) for the
backward. Nothing of size Tq x Tk is stored.

Backward, with P recomputed as exp(z - lse) and delta_i = sum_d dO_id O_id (= sum_j P_ij dP_ij; a preprocess):

    dV = P^T dO,   dP = dO V^T,   dZ = P * (dP - delta),   dS = dZ * (1 - t^2)  (the cap's derivative)
    dQ = scale * dS K,   dK = scale * dS^T Q

It is two kernels, not one with atomics: one program per (key block, batch, KV head) accumulates dK and dV in
registers over every query block and every query head of its GQA group, and one program per (query block,
batch, query head) accumulates dQ over the key blocks. This recomputes Q K^T and dO V^T once more than the
atomic variant, but it writes each gradient once, needs no fp32 dQ buffer, and is deterministic for given blocks
(the same bits every run, as every other kernel here), with the GQA sum over a group's query heads done in
registers. On a GPU the blocks are autotuned per head dim, flags and length bucket (``_launch``); the choice is
cached by Triton, so a machine's later runs take the same blocks (its first run's may differ from another
machine's, as cuBLAS's algorithms do). ``PRONGHORN_SOFTCAP_AUTOTUNE=0``: fixed blocks, no tuning.

Visibility: queries are the last Tq of Tk positions (query i sits at key position p_i = i + Tk - Tq). Key j is
visible to query i when ``causal`` gives j <= p_i, a ``window`` w gives p_i - w < j (Gemma 2's sliding layers,
as ``models.attention.build_attention_mask``), ``key_padding[b, j]`` is nonzero (HF's [B, Tk] attention
mask: left or right padding, or any pattern), and, for packed (padding-free) rows, ``seq_ids[b, j]`` equals the
query's ``seq_ids[b, i]`` (the sequence index of each token, models.attention.sequence_ids; Tq == Tk). Key blocks a query block cannot see (causal, window) are skipped.
A query that sees no key gets a zero output and zero gradients (its lse is stored as +inf).

Numerics: fp16/bf16/fp32 inputs, fp32 scores, softmax statistics and accumulators; fp32 inputs take IEEE fp32
dots (no TF32). As in FlashAttention, P and dS are rounded to the input dtype before their dots (the reference
rounds its probabilities too) and delta comes from the output as stored (rounded); the bf16 error this gives is
measured and bounded in tests/kernels/test_softcapped_attention.py. tanh is computed here (no libdevice, which the interpreter lacks): an odd Taylor polynomial
below |x| = 0.3 and (1 - e) / (1 + e), e = exp(-2|x|), above, a few fp32 ulps from ``torch.tanh`` everywhere.
Head dims up to 256, any size (the feature axis is padded to a power of two and masked).
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable


@triton.jit
def _tanh(x):
    """tanh in fp32: odd Taylor series (to x^11, truncation < 2e-9 relative) where |x| < 0.3, else
    (1 - e) / (1 + e) with e = exp(-2|x|) (no cancellation there: 1 - e > 0.45)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    x2 = a * a
    poly = x2 * (-1382.0 / 155925.0) + 62.0 / 2835.0
    poly = poly * x2 - 17.0 / 315.0
    poly = poly * x2 + 2.0 / 15.0
    poly = poly * x2 - 1.0 / 3.0
    near = a + a * (x2 * poly)
    t = tl.where(a < 0.3, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    """a @ b with fp32 accumulation. ``FP32``: the operands widened to fp32 and multiplied as IEEE fp32 (not
    TF32): fp32 inputs, and 16-bit ones in the interpreter, whose dot multiplies bf16's raw bits (numpy has no
    bf16); 16-bit products are exact in fp32, so that is the GPU's 16-bit dot up to the order of the sum."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _visible(qi, kj, kp, qs, ks, Tq, Tk, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PADDED: tl.constexpr,
             DOCS: tl.constexpr):
    """True where key ``kj`` is visible to query ``qi`` (both in range); ``qi`` and ``kj`` (and ``kp``, the key
    padding at ``kj``; ``qs`` / ``ks``, the sequence ids of packed rows at ``qi`` / ``kj``) are broadcast against
    each other: [M, 1] x [1, N], or [1, M] x [N, 1] for a transposed tile."""
    ok = (qi < Tq) & (kj < Tk)
    pos = qi + (Tk - Tq)
    if CAUSAL:
        ok = ok & (kj <= pos)
    if WINDOW:
        ok = ok & (kj > pos - window)
    if PADDED:
        ok = ok & (kp != 0)
    if DOCS:
        ok = ok & (qs == ks)
    return ok


@triton.jit
def _key_padding(KP, b, stride_kpb, cols, Tk, PADDED: tl.constexpr):
    """Row ``b`` of the key padding mask at ``cols`` (0 where padding or out of range), or a dummy; int32 either
    way (the compiler wants one return type: the mask's own dtype may be bool, uint8 or int64)."""
    if PADDED:
        return tl.load(KP + b.to(tl.int64) * stride_kpb + cols, mask=cols < Tk, other=0).to(tl.int32)
    return cols.to(tl.int32)


@triton.jit
def _seq_ids(SID, b, stride_sb, idx, n, DOCS: tl.constexpr):
    """The sequence ids of packed rows ``b`` at ``idx`` (-1 out of range), or a dummy; int32 either way."""
    if DOCS:
        return tl.load(SID + b.to(tl.int64) * stride_sb + idx, mask=idx < n, other=-1).to(tl.int32)
    return idx.to(tl.int32)


@triton.jit
def _capped_scores(a, b, qk_scale, softcap, inv_cap, FP32: tl.constexpr):
    """(z = c * tanh(s / c), t = tanh(s / c)) for s = scale * a @ b, in fp32."""
    t = _tanh(_dot(a, b, FP32) * qk_scale * inv_cap)
    return softcap * t, t


@triton.jit
def _tile_ptrs(P, b, h, sb, sh, st, idx, dims):
    """Pointers to rows ``idx`` of head ``h`` of batch ``b`` of a [B, H, T, D] tensor (int64 base offset)."""
    return P + b.to(tl.int64) * sb + h.to(tl.int64) * sh + idx[:, None] * st + dims[None, :]


@triton.jit
def _load_tile(P, b, h, sb, sh, st, idx, n, dims, D):
    """The [len(idx), BLOCK_D] tile at rows ``idx`` (< n) and features ``dims`` (< D), zeros outside."""
    mask = (idx[:, None] < n) & (dims[None, :] < D)
    return tl.load(_tile_ptrs(P, b, h, sb, sh, st, idx, dims), mask=mask, other=0.0)


@triton.jit
def _store_tile(P, b, h, sb, sh, st, idx, n, dims, D, value):
    mask = (idx[:, None] < n) & (dims[None, :] < D)
    tl.store(_tile_ptrs(P, b, h, sb, sh, st, idx, dims), value.to(P.dtype.element_ty), mask=mask)


@triton.jit
def _key_range(pid_m, Tq, Tk, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the key blocks query block ``pid_m`` can see: causal bounds the end, a window the start."""
    first = pid_m * BLOCK_M + (Tk - Tq)  # key position of the block's first query
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, first + BLOCK_M)
    lo = 0
    if WINDOW:
        lo = tl.maximum(0, first - window + 1) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _query_range(pid_n, Tq, Tk, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the query rows that can see key block ``pid_n``: causal bounds the start, a window the end."""
    off = Tk - Tq
    lo = 0
    if CAUSAL:
        lo = tl.maximum(0, pid_n * BLOCK_N - off) // BLOCK_M * BLOCK_M
    hi = Tq
    if WINDOW:
        hi = tl.minimum(Tq, pid_n * BLOCK_N + BLOCK_N - 1 + window - off)
    return lo, hi


@triton.jit
def _query_program(n_heads, group, BLOCK_M: tl.constexpr):
    """(query block, batch * head, batch, head, its KV head, query rows) of a program over query blocks."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % n_heads
    return pid_m, bh, bh // n_heads, h, h // group, pid_m * BLOCK_M + tl.arange(0, BLOCK_M)


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KP, SID,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, stride_kpb, stride_sb,
    n_heads, group, Tq, Tk, D, window, qk_scale, softcap, inv_cap, T_BUCKET,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PADDED: tl.constexpr, DOCS: tl.constexpr, FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, bh, b, h, hk, rows = _query_program(n_heads, group, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_tile(Q, b, h, sqb, sqh, sqt, rows, Tq, dims, D)
    qs = _seq_ids(SID, b, stride_sb, rows, Tq, DOCS)
    lo, hi = _key_range(pid_m, Tq, Tk, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_tile(K, b, hk, skb, skh, skt, cols, Tk, dims, D)
        z, _ = _capped_scores(q, tl.trans(k), qk_scale, softcap, inv_cap, FP32)
        kp = _key_padding(KP, b, stride_kpb, cols, Tk, PADDED)
        ks = _seq_ids(SID, b, stride_sb, cols, Tk, DOCS)
        ok = _visible(rows[:, None], cols[None, :], kp[None, :], qs[:, None], ks[None, :], Tq, Tk, window, CAUSAL,
                      WINDOW, PADDED, DOCS)
        z = tl.where(ok, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: exp(-inf - 0) = 0
        p = tl.exp(z - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V, b, hk, svb, svh, svt, cols, Tk, dims, D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32)
        m_i = m_new

    seen = l_i > 0.0
    _store_tile(O, b, h, sob, soh, sot, rows, Tq, dims, D, acc / tl.where(seen, l_i, 1.0)[:, None])
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * Tq + rows, lse, mask=rows < Tq)


@triton.jit
def _delta_kernel(
    O, DO, DELTA, sob, soh, sot, sdb, sdh, sdt, n_heads, Tq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = sum_d dO_id O_id in fp32, one row block of one (batch, head) per program."""
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    o = _load_tile(O, b, h, sob, soh, sot, rows, Tq, dims, D).to(tl.float32)
    do = _load_tile(DO, b, h, sdb, sdh, sdt, rows, Tq, dims, D).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Tq + rows, tl.sum(o * do, 1), mask=rows < Tq)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KP, SID,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, stride_kpb,
    stride_sb, n_kv_heads, group, Tq, Tk, D, window, qk_scale, softcap, inv_cap, T_BUCKET,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PADDED: tl.constexpr, DOCS: tl.constexpr, FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one key block of one (batch, KV head), summed over the group's query heads; works on the
    transposed scores [keys, queries] so no [M, N] tile is transposed."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _load_tile(K, b, hk, skb, skh, skt, cols, Tk, dims, D)
    v = _load_tile(V, b, hk, svb, svh, svt, cols, Tk, dims, D)
    kp = _key_padding(KP, b, stride_kpb, cols, Tk, PADDED)
    ks = _seq_ids(SID, b, stride_sb, cols, Tk, DOCS)
    lo, hi = _query_range(pid_n, Tq, Tk, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(group):
        h = hk * group + g
        stats = (b.to(tl.int64) * n_kv_heads * group + h) * Tq
        for start in range(lo, hi, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            q = _load_tile(Q, b, h, sqb, sqh, sqt, rows, Tq, dims, D)
            do = _load_tile(DO, b, h, sdb, sdh, sdt, rows, Tq, dims, D)
            lse = tl.load(LSE + stats + rows, mask=rows < Tq, other=float("inf"))
            delta = tl.load(DELTA + stats + rows, mask=rows < Tq, other=0.0)
            zt, tt = _capped_scores(k, tl.trans(q), qk_scale, softcap, inv_cap, FP32)  # [keys, queries]
            qs = _seq_ids(SID, b, stride_sb, rows, Tq, DOCS)
            ok = _visible(rows[None, :], cols[:, None], kp[:, None], qs[None, :], ks[:, None], Tq, Tk, window,
                          CAUSAL, WINDOW, PADDED, DOCS)
            pt = tl.where(ok, tl.exp(zt - lse[None, :]), 0.0)
            dv += _dot(pt.to(do.dtype), do, FP32)
            dpt = _dot(v, tl.trans(do), FP32)
            dst = pt * (dpt - delta[None, :]) * (1.0 - tt * tt)
            dk += _dot(dst.to(q.dtype), q, FP32)

    _store_tile(DK, b, hk, sdkb, sdkh, sdkt, cols, Tk, dims, D, dk * qk_scale)
    _store_tile(DV, b, hk, sdvb, sdvh, sdvt, cols, Tk, dims, D, dv)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KP, SID,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sdqb, sdqh, sdqt, stride_kpb, stride_sb,
    n_heads, group, Tq, Tk, D, window, qk_scale, softcap, inv_cap, T_BUCKET,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PADDED: tl.constexpr, DOCS: tl.constexpr, FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of one query block of one (batch, query head), over the key blocks it sees."""
    pid_m, bh, b, h, hk, rows = _query_program(n_heads, group, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_tile(Q, b, h, sqb, sqh, sqt, rows, Tq, dims, D)
    do = _load_tile(DO, b, h, sdb, sdh, sdt, rows, Tq, dims, D)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=0.0)
    qs = _seq_ids(SID, b, stride_sb, rows, Tq, DOCS)
    lo, hi = _key_range(pid_m, Tq, Tk, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_tile(K, b, hk, skb, skh, skt, cols, Tk, dims, D)
        v = _load_tile(V, b, hk, svb, svh, svt, cols, Tk, dims, D)
        z, t = _capped_scores(q, tl.trans(k), qk_scale, softcap, inv_cap, FP32)
        kp = _key_padding(KP, b, stride_kpb, cols, Tk, PADDED)
        ks = _seq_ids(SID, b, stride_sb, cols, Tk, DOCS)
        ok = _visible(rows[:, None], cols[None, :], kp[None, :], qs[:, None], ks[None, :], Tq, Tk, window, CAUSAL,
                      WINDOW, PADDED, DOCS)
        p = tl.where(ok, tl.exp(z - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), FP32)
        ds = p * (dp - delta[:, None]) * (1.0 - t * t)
        dq += _dot(ds.to(k.dtype), k, FP32)

    _store_tile(DQ, b, h, sdqb, sdqh, sdqt, rows, Tq, dims, D, dq * qk_scale)


# The interpreter (CPU tensors) takes 16 x 16 blocks, so tests of a few dozen tokens cover several blocks, the
# skipped ones and partial tails; None: the GPU's blocks (tests of the wide-head tiles set it).
INTERPRETER_BLOCKS: tuple[int, int, int, int] | None = (16, 16, 4, 1)


def _blocks(d: int, dtype: torch.dtype, kernel: str, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for head dim ``d``; smaller tiles for wide heads and fp32
    so the Q/K/V tiles of a program fit in shared memory. Untuned (chosen without a GPU)."""
    if device.type != "cuda" and INTERPRETER_BLOCKS is not None:
        return INTERPRETER_BLOCKS
    wide = d > 128 or (d > 64 and dtype == torch.float32)
    if kernel == "fwd":
        return (64, 32, 8, 2) if wide else (64, 64, 4, 2)
    return (32, 32, 8, 1) if wide else (32, 64, 4, 2)  # dkdv and dq alike: two fp32 [N|M, D] accumulators


# On a GPU each kernel is autotuned over these (BLOCK_M, BLOCK_N, num_warps, num_stages), per head dim, flags,
# dtype and power-of-two length bucket (packed rows of every length share a bucket's choice); configs that do not
# fit a GPU's registers or shared memory are skipped by the tuner. _blocks' untuned choice is among them.
# PRONGHORN_SOFTCAP_AUTOTUNE=0 takes _blocks' choice instead (no tuning: a shorter first step).
_FWD_CONFIGS = [(64, 32, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3)]
_BWD_CONFIGS = [(32, 32, 8, 1), (32, 64, 4, 2), (64, 32, 8, 1), (64, 64, 8, 1), (32, 32, 4, 2), (64, 64, 8, 2)]
_AUTOTUNE_KEY = ["D", "T_BUCKET", "CAUSAL", "WINDOW", "PADDED", "DOCS", "FP32"]
_TUNED: dict = {}


def _tuning(device: torch.device) -> bool:
    """Whether launches on ``device`` are autotuned: on a GPU, unless PRONGHORN_SOFTCAP_AUTOTUNE=0 or a CUDA graph
    is being captured (timing configs cannot run inside a capture)."""
    if device.type != "cuda" or os.environ.get("PRONGHORN_SOFTCAP_AUTOTUNE", "1") == "0":
        return False
    return not torch.cuda.is_current_stream_capturing()


def _tuned(kernel, configs) -> "triton.runtime.Autotuner":
    """``kernel`` autotuned over ``configs`` (made once per kernel). The choice is kept in Triton's cache where
    this Triton can (``cache_results``), so later runs on the machine take the same blocks, and so the same bits."""
    if kernel not in _TUNED:
        keep = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
        _TUNED[kernel] = triton.autotune(
            [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=st) for m, n, w, st in configs],
            key=_AUTOTUNE_KEY, **keep)(kernel)
    return _TUNED[kernel]


def _launch(kernel, which: str, grid, args: tuple, kw: dict, d: int, dtype: torch.dtype, device: torch.device) -> None:
    """Run ``kernel`` with ``grid(BLOCK_M, BLOCK_N)``: autotuned where :func:`_tuning` says, else with
    :func:`_blocks`' choice (``which``: "fwd" or "bwd"; the dQ kernel takes the backward's blocks swapped: it
    holds a query block and walks key blocks)."""
    if _tuning(device):
        configs = _FWD_CONFIGS if which == "fwd" else _BWD_CONFIGS
        if kernel is _bwd_dq_kernel:
            configs = [(n, m, w, st) for m, n, w, st in configs]
        _tuned(kernel, configs)[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **kw)
        return
    bm, bn, warps, stages = _blocks(d, dtype, which, device)
    if kernel is _bwd_dq_kernel:
        bm, bn = bn, bm
    kernel[grid(bm, bn)](*args, **kw, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)


def _length_bucket(t: int) -> int:
    return triton.next_power_of_2(max(1, t))


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _flags(causal, window, key_padding, seq_ids, q: torch.Tensor) -> dict:
    return dict(CAUSAL=bool(causal), WINDOW=window is not None, PADDED=key_padding is not None,
                DOCS=seq_ids is not None, FP32=q.dtype == torch.float32 or not q.is_cuda)


def _padding_arg(key_padding: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the [B, Tk] key mask as a kernel argument, its batch stride), or a dummy pointer when there is none."""
    if key_padding is None:
        return like, 0
    kp = key_padding.view(torch.uint8) if key_padding.dtype == torch.bool else key_padding
    kp = _unit_last(kp)
    return kp, kp.stride(0)


def _seq_ids_arg(seq_ids: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the [B, T] sequence ids of packed rows as a kernel argument, their batch stride), or a dummy."""
    if seq_ids is None:
        return like, 0
    sid = _unit_last(seq_ids)
    return sid, sid.stride(0)


def softcapped_attention_forward(q, k, v, causal, softcap, scale, window, key_padding, seq_ids=None):
    """(out [B, Hq, Tq, D], lse [B, Hq, Tq] fp32). ``out`` is laid out [B, Tq, Hq, D] in memory, so the
    model's ``out.transpose(1, 2).reshape(B, Tq, Hq * D)`` is free."""
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    out = torch.empty(b, tq, hq, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    kp, stride_kpb = _padding_arg(key_padding, q)
    sid, stride_sb = _seq_ids_arg(seq_ids, q)
    args = (q, k, v, out, lse, kp, sid, *_strides(q), *_strides(k), *_strides(v), *_strides(out), stride_kpb,
            stride_sb, hq, hq // hk, tq, tk, d, window or 0, scale, softcap, 1.0 / softcap, _length_bucket(tk))
    kw = dict(**_flags(causal, window, key_padding, seq_ids, q), BLOCK_D=max(16, triton.next_power_of_2(d)))
    _launch(_fwd_kernel, "fwd", lambda bm, bn: (triton.cdiv(tq, bm), b * hq), args, kw, d, q.dtype, q.device)
    return out, lse


def softcapped_attention_backward(do, q, k, v, out, lse, causal, softcap, scale, window, key_padding, seq_ids=None):
    """(dq, dk, dv) from the upstream gradient and what the forward saved."""
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    do = _unit_last(do)
    block_d = max(16, triton.next_power_of_2(d))
    flags = _flags(causal, window, key_padding, seq_ids, q)
    kp, stride_kpb = _padding_arg(key_padding, q)
    sid, stride_sb = _seq_ids_arg(seq_ids, q)
    delta = torch.empty_like(lse)
    rows = max(16, 8192 // block_d)  # two [rows, BLOCK_D] fp32 tiles per program
    _delta_kernel[(triton.cdiv(tq, rows), b * hq)](
        out, do, delta, *_strides(out), *_strides(do), hq, tq, d, BLOCK_M=rows, BLOCK_D=block_d,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bucket, kw = _length_bucket(tk), dict(**flags, BLOCK_D=block_d)
    tail = (tq, tk, d, window or 0, scale, softcap, 1.0 / softcap, bucket)
    _launch(_bwd_dkdv_kernel, "bwd", lambda bm, bn: (triton.cdiv(tk, bn), b * hk),
            (q, k, v, do, lse, delta, dk, dv, kp, sid, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
             *_strides(dk), *_strides(dv), stride_kpb, stride_sb, hk, hq // hk, *tail), kw, d, q.dtype, q.device)
    _launch(_bwd_dq_kernel, "bwd", lambda bm, bn: (triton.cdiv(tq, bm), b * hq),
            (q, k, v, do, lse, delta, dq, kp, sid, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
             *_strides(dq), stride_kpb, stride_sb, hq, hq // hk, *tail), kw, d, q.dtype, q.device)
    return dq, dk, dv


class SoftcappedAttentionFunction(torch.autograd.Function):
    """``apply(q, k, v, causal, softcap, scale, window, key_padding, seq_ids)`` -> out; gradients for q, k and v."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, softcap: float, scale: float, window: int | None,
                key_padding: torch.Tensor | None, seq_ids: torch.Tensor | None = None):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        args = (bool(causal), float(softcap), float(scale), None if window is None else int(window), key_padding,
                seq_ids)
        out, lse = softcapped_attention_forward(q, k, v, *args)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = args
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = softcapped_attention_backward(do, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None
