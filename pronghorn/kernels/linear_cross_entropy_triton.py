"""Output head + cross-entropy, fused and chunked, with every gradient produced during the forward.

Per call (``hidden`` [N, H], ``weight`` [V, H], ``labels`` [N], already shifted and flattened):

1. **Compact.** Rows whose label is ``ignore_index`` are dropped before any matmul: a stable argsort of the
   ignore mask puts the valid rows first in their original order (no host round trip).
2. **Chunk.** The valid rows run in chunks of at most ``chunk_size`` rows (default: as many rows as fit a
   ~1 GiB logits buffer, e.g. 4,096 rows at V = 128,256 in bf16), split evenly so the last chunk is not a
   sliver. One [rows, V] buffer is allocated once and reused by every chunk; nothing ever holds the
   [N, V] logits, and no fp32 copy of the logits exists at any time.
3. **Per chunk:** ``logits = h_c @ W^T`` (cuBLAS, input dtype, written into the buffer); then ONE Triton
   kernel, one program per row, makes an online max/sum pass over the row in vocab blocks (fp32, optional
   softcap ``t * tanh(x / t)``), stores the row's loss ``lse - x[label]``, and makes a second pass that
   overwrites the row in place with ``(softmax - onehot) * d(softcap)``; then
   ``dh_c = dlogits @ W`` (written straight into the compact dh buffer) and, only if the weight needs a
   gradient, ``dW += dlogits^T @ h_c``: with one chunk a single matmul in the weight's dtype (what an
   unfused head does, cuBLAS accumulating in fp32), with several an fp32 accumulator fed by cuBLAS's
   bf16-in/fp32-out GEMM (the first chunk writes it, so no zero fill).
4. **Backward** only scales the stored gradients by ``grad_output / num_items`` (one small Triton pass
   each, fp32 scale applied before the single rounding).

The second pass re-reads a row the first pass read a moment before (rows are 256 KB at V = 128k in bf16);
it walks the blocks last-to-first so it starts on what is most likely still in L2. HBM traffic per chunk
is about one read and one write of the logits plus a partial re-read, next to three (two with a frozen
head) matmuls that each read them once.

Measured on one H100 80GB HBM3 (torch 2.11, triton 3.6, bf16, V = 128,256, fwd+bwd, median of 11; scratch
script, not in the repo): the CE kernel alone on a [4096, 128256] chunk takes 1.01 ms (2.1 TB/s counting
one read + one write; BLOCK_V 16384 / 16 warps / reversed pass 2 was the best of 10 variants, 1.0-1.23
ms). Whole op, frozen head (LoRA), ms: H=4096 N=4096: 13.6 (torch materialised bf16 logits 15.0, HF-style
fp32 logits 20.4, Liger 0.8.5 26.9); H=4096 N=16384: 53.4 (61.3, 83.8, 59.0); H=2048 N=16384: 28.5 (35.4,
58.0, 33.6); trainable head H=4096 N=4096: 20.9 (21.6, 26.7, 61.7). Peak extra memory ~1 GiB (+ the fp32
dW accumulator when trainable and chunked) vs 2.9-23 GiB for the materialised versions. 50% ignored rows
halve our time; the materialised baselines do not drop them. The matmuls run at 620-650 TFLOP/s
effective (8B head), against ~730-790 for one large cuBLAS bf16 GEMM there.

**Host synchronisation: exactly one, hidden.** The number of valid rows decides how many rows go through
the matmuls, and a cuBLAS call needs its shape on the host, so skipping ignored rows *exactly* needs that
count on the host. The alternative, an upper bound (all N rows, ignored ones masked in the kernel), needs
no sync but spends matmul time on every ignored row: with prompt-masked SFT data that is 20-60% of the
head's ~10-30 ms, against the ~10-30 us a sync costs. So the count is copied to pinned host memory
asynchronously, the argsort is enqueued behind that copy, and the host waits on an event recorded right
after the copy: the GPU keeps busy with the sort while the host wakes up, so the GPU does not idle. What
the sync does cost: the call cannot be captured in a CUDA graph, and, when the count is taken here, the host
loses its lead over the GPU once per step. The model's forward takes it at its top instead
(``kernels/valid_rows.py``), so that the copy has landed long before the loss asks for it. The caller's
``num_items`` (int or tensor, any device) is never read back: a device tensor is used as a device tensor, a
CPU tensor is read on the host, which needs no device sync.

**Scaling.** The gradients stored between forward and backward are *unscaled* (for a summed loss); the
factor ``grad_output / num_items`` is applied once in backward, in fp32. Scaling by ``1 / num_items``
inside the kernel would underflow fp16 gradients before a GradScaler's factor could lift them. A chunked
``dW`` stays in its fp32 accumulator until backward (memory: 4·V·H bytes, 2 GiB for an 8B head, only when
the head is trainable), and fp16 always uses it (an unscaled fp16 ``dW`` could overflow).

Gradient of ignored rows of ``hidden``: zero. Frozen weight: no dW matmul, gradient ``None``. Tied weight
(lm_head = embedding): nothing special, autograd adds this gradient to the embedding's. Labels must lie in
[0, V) (or equal ``ignore_index``); this is checked on the device without a sync (a device-side assert, as
``F.cross_entropy`` does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_cross_entropy import IGNORE_INDEX
from .logits_chunks import chunk_rows
from .valid_rows import ValidRows

_BLOCK_V = 16384  # vocab elements per loop step of the CE kernel on the GPU (H100 sweep: best with 16 warps)
_NUM_WARPS = 16


@triton.jit
def _tanh(x):
    # tanh from one exp, without overflow: tanh(|x|) = (1 - e^{-2|x|}) / (1 + e^{-2|x|}).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _ce_rows_kernel(
    logits_ptr, labels_ptr, loss_ptr, entropy_ptr, stride_row, ignore_index, softcap,
    V: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    REVERSE: tl.constexpr = True, WITH_ENTROPY: tl.constexpr = False,
):
    """One program per row: loss_ptr[row] = lse - x[label]; if WRITE_GRAD the row becomes dloss/dlogits; if
    WITH_ENTROPY entropy_ptr[row] = lse - sum_v softmax_v x_v, the entropy of the row's distribution (x capped)."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    label = tl.where(valid, label, 0)
    cols0 = tl.arange(0, BLOCK_V)

    # Pass 1: running max m and running sum d of exp(x - m) over vocab blocks, in fp32.
    # With WITH_ENTROPY also the running sum s of exp(x - m) * x, rescaled as d is.
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.full((), 0.0, tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        x = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        rescale = tl.exp(m - m_new)
        e = tl.exp(x - m_new)  # 0 past the row's end, where z is 0
        d = d * rescale + tl.sum(e, axis=0)
        if WITH_ENTROPY:
            s = s * rescale + tl.sum(e * z, axis=0)
        m = m_new
    lse = m + tl.log(d)

    x_label = tl.load(base + label).to(tl.float32)  # read before pass 2 overwrites it
    if HAS_SOFTCAP:
        x_label = softcap * _tanh(x_label / softcap)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_label, 0.0))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, lse - s / d, 0.0))

    if WRITE_GRAD:
        # Pass 2: softmax - onehot (times the softcap's derivative), in place; zeros for an ignored row.
        # Walks the blocks last to first, so it starts on those pass 1 read last (most likely still in L2).
        NUM_BLOCKS: tl.constexpr = (V + BLOCK_V - 1) // BLOCK_V
        for i in range(0, NUM_BLOCKS):
            start = (NUM_BLOCKS - 1 - i) * BLOCK_V if REVERSE else i * BLOCK_V
            cols = start + cols0
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                x = softcap * t
            g = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            g = tl.where(valid, g, 0.0)
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(x_ptr, out_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    """out = x * scale in fp32, cast once to out's dtype (scale is a 0-d fp32 device tensor)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x * tl.load(scale_ptr)).to(out_ptr.dtype.element_ty), mask=mask)


def _scaled(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x * scale as a new contiguous tensor of ``dtype``, the fp32 scale applied without rounding it first."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    n = x.numel()
    if n:
        block = 4096
        _scale_kernel[(triton.cdiv(n, block),)](x, out, scale, n, BLOCK=block, num_warps=8)
    return out


def ce_rows(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, ignore_index: int,
             softcap: float | None, write_grad: bool, block_v: int | None = None,
             entropy: torch.Tensor | None = None) -> None:
    """Run the CE kernel over the rows of a contiguous-row ``logits`` [M, V] (in place when write_grad); with
    ``entropy`` (fp32 [M]) each row's entropy is written there too, from the first pass (before any overwrite)."""
    rows, V = logits.shape
    if rows == 0:
        return
    if block_v is None:
        block_v = min(_BLOCK_V, triton.next_power_of_2(V))
    warps = _NUM_WARPS if block_v >= 8192 else 8 if block_v >= 2048 else 4
    _ce_rows_kernel[(rows,)](
        logits, labels, loss, loss if entropy is None else entropy, logits.stride(0), ignore_index,
        float(softcap or 1.0), V=V, HAS_SOFTCAP=bool(softcap), WRITE_GRAD=write_grad, BLOCK_V=block_v,
        WITH_ENTROPY=entropy is not None, num_warps=warps,
    )


def _dweight(acc: torch.Tensor | None, dlogits: torch.Tensor, h: torch.Tensor, fp32: bool) -> torch.Tensor:
    """dlogits^T @ h, added to ``acc`` when given; with ``fp32`` the result (and the sum) is fp32."""
    a = dlogits.t()
    if not fp32 or a.dtype == torch.float32:
        return a @ h if acc is None else acc.addmm_(a, h)
    if not a.is_cuda:  # CPU (tests): no mixed-dtype matmul
        return (a @ h).float() if acc is None else acc.add_(a @ h)
    if acc is None:  # bf16/fp16 operands, fp32 output straight from cuBLAS
        return torch.mm(a, h, out_dtype=torch.float32)
    return torch.addmm(acc, a, h, out_dtype=torch.float32, out=acc)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """loss = sum over non-ignored rows of CE(hidden @ weight^T, labels) / num_items, gradients in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, num_items, ignore_index, softcap, chunk_size, need_dh, need_dw,
                block_v, valid_rows):
        N, H = hidden.shape
        V = weight.shape[0]
        if valid_rows is None:
            valid_rows = ValidRows(labels, ignore_index)
        n, order = valid_rows.count(), valid_rows.order
        all_valid = n == N
        idx = order[:n]
        y = labels.contiguous() if all_valid else labels.index_select(0, idx)
        if n:
            torch._assert_async(((y >= 0) & (y < V)).all(), "linear_cross_entropy: a label is outside [0, vocab)")

        write_grad = need_dh or need_dw
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        dh_c = torch.empty(n, H, dtype=hidden.dtype, device=hidden.device) if need_dh else None
        rows = chunk_rows(n, V, hidden.element_size(), chunk_size)
        # dW: one chunk -> one matmul in the weight's dtype (as an unfused head would); several chunks -> fp32
        # accumulator. fp16 always accumulates in fp32: the unscaled sum can exceed fp16's range.
        dw, dw_fp32 = None, rows < n or weight.dtype == torch.float16
        buf = torch.empty(min(rows, n), V, dtype=hidden.dtype, device=hidden.device)
        for s in range(0, n, rows):
            e = min(s + rows, n)
            h_c = hidden[s:e] if all_valid else hidden.index_select(0, idx[s:e])
            logits = buf[: e - s]
            torch.mm(h_c, weight.t(), out=logits)
            ce_rows(logits, y[s:e], losses[s:e], ignore_index, softcap, write_grad, block_v)
            if need_dh:
                torch.mm(logits, weight, out=dh_c[s:e])
            if need_dw:
                dw = _dweight(dw, logits, h_c, dw_fp32)
        del buf

        if need_dw and dw is None:  # no valid rows
            dw = torch.zeros_like(weight)
        dh = None
        if need_dh:
            dh = dh_c if all_valid else dh_c.new_zeros(N, H).index_copy_(0, idx, dh_c)
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype

        if isinstance(num_items, torch.Tensor):
            if num_items.device.type == "cpu":
                denom = float(num_items)  # host memory: reading it needs no device sync
            else:
                denom = num_items.to(device=hidden.device, dtype=torch.float32)
        else:
            denom = n if num_items is None else num_items
        ctx.denom = denom
        return losses.sum() / denom

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        scale = (grad_out.to(torch.float32) / ctx.denom).reshape(())  # 0-d fp32 on the device
        gh = _scaled(dh, scale, dh.dtype) if dh is not None else None
        gw = _scaled(dw, scale, ctx.weight_dtype) if dw is not None else None
        return gh, gw, None, None, None, None, None, None, None, None, None


def linear_cross_entropy_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    chunk_size: int | None = None,
    block_v: int | None = None,
    valid_rows: ValidRows | None = None,
) -> torch.Tensor:
    """Fused chunked head + CE; ``chunk_size`` caps rows per chunk (default: a ~1 GiB logits buffer).
    ``valid_rows``: ``labels``' count and order of valid rows, started earlier (``kernels/valid_rows.py``)."""
    if valid_rows is not None and not valid_rows.matches(labels, ignore_index):
        raise ValueError("linear_cross_entropy: valid_rows were counted for other labels")
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)  # differentiable cast (autocast-style mixed dtypes)
    grad = torch.is_grad_enabled()
    return LinearCrossEntropyFunction.apply(
        hidden, weight, labels, num_items, ignore_index, softcap, chunk_size,
        grad and hidden.requires_grad, grad and weight.requires_grad, block_v, valid_rows,
    )
