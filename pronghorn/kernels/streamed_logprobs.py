"""Per-token log-probabilities with the output head's weight read slice by slice from host memory.

When a tied embedding table lives in pinned host memory (``offload_embedding="tied"``), the output head's
weight [V, H] is not on the GPU. :func:`streamed_logprobs` computes ``log_softmax(hidden @ W^T)[i, labels[i]]``
with the vocabulary as the outer loop: each slice of ``vocab_chunk`` rows of W is copied to the device once (on
a side stream, the next slice while the current one is used), and every token row keeps an online fp32
max / sum of exponentials, its label's logit and, when ``hidden`` needs a gradient, the running
``sum_v exp(z_v - max) W_v``. So W crosses PCIe once per call, and only [row tile, vocab_chunk] logits exist.
With ``softcap`` (Gemma 2's final logit cap) z is the capped logit ``c * tanh(x / c)`` and each W_v is weighted
by the cap's derivative ``1 - tanh^2`` as well.

The head is frozen (LoRA/QLoRA), so, as in :mod:`.linear_logprobs`, the gradient with respect to ``hidden``
is produced in the forward: d logp_i / d h_i = c'_label W[label_i] - (softmax_i * c') @ W (c' the cap's
derivative, 1 without a cap); backward scales its rows.
Logits are computed in the input dtype and the reductions in fp32, like the chunked head. With ``entropy`` each
row also keeps the running ``sum_v exp(z_v - max) z_v``, so its entropy ``lse - sum softmax * z`` comes from the
same pass. Reference: ``linear_logprobs_reference``. Ignored rows (``ignore_index``) give 0 and no gradient.
"""

from __future__ import annotations

import torch

from .linear_cross_entropy import IGNORE_INDEX
from .linear_logprobs import kept_rows

VOCAB_CHUNK = 8192
ROW_TILE = 2048


def streamed_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX, vocab_chunk: int = VOCAB_CHUNK,
                      row_tile: int = ROW_TILE, keep_rows: torch.Tensor | None = None,
                      softcap: float | None = None, entropy: bool = False
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 [N] log-probs of ``labels`` under ``hidden`` [N, H] @ ``weight`` [V, H]^T; ``weight`` may be on the
    host (pinned: the copies overlap) while ``hidden`` is on a GPU. ``weight`` must not need a gradient.
    ``keep_rows``: the indices of the rows not ignored, when the caller knows them (no host sync). ``softcap``:
    the logits are capped as ``c * tanh(x / c)`` before the softmax (None: not). ``entropy``: return (log-probs,
    each row's entropy: 0 at ignored rows, no gradient)."""
    if weight.requires_grad:
        raise ValueError("streamed_logprobs takes a frozen head; its weight requires grad")
    out, ent = _StreamedLogprobs.apply(hidden, weight, labels, ignore_index, vocab_chunk, row_tile, keep_rows,
                                       softcap, entropy)
    return (out, ent) if entropy else out


class _StreamedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, vocab_chunk, row_tile, keep_rows, softcap, want_entropy):
        rows = kept_rows(labels, ignore_index, keep_rows)
        h, y = hidden.index_select(0, rows), labels.index_select(0, rows)
        want_grad = ctx.needs_input_grad[0]
        picked, lse, grad, mean_z = _scan(h, weight, y, vocab_chunk, row_tile, want_grad, softcap, want_entropy)
        out = torch.zeros(labels.shape, dtype=picked.dtype, device=hidden.device)
        out.index_copy_(0, rows, picked - lse)
        ent = torch.zeros(labels.shape if want_entropy else (0,), dtype=picked.dtype, device=hidden.device)
        if want_entropy:
            ent.index_copy_(0, rows, lse - mean_z)
        ctx.mark_non_differentiable(ent)
        if want_grad:
            ctx.save_for_backward(rows, grad)
            ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        return out, ent

    @staticmethod
    def backward(ctx, dout, _dentropy):
        rows, grad = ctx.saved_tensors
        dh = torch.zeros(ctx.hidden_shape, dtype=ctx.hidden_dtype, device=grad.device)
        dh.index_copy_(0, rows, (grad * dout.index_select(0, rows).to(grad.dtype).unsqueeze(-1)).to(dh.dtype))
        return (dh,) + (None,) * 8


def _scan(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, vocab_chunk: int, row_tile: int,
          want_grad: bool, softcap: float | None, want_entropy: bool = False):
    """One pass over the vocabulary: (label logit, log-sum-exp, d logp / d h or None, the softmax-weighted mean
    logit or None) per row of ``h``."""
    acc_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    n = h.shape[0]
    peak = torch.full((n,), float("-inf"), dtype=acc_dtype, device=h.device)
    total = torch.zeros(n, dtype=acc_dtype, device=h.device)
    picked = torch.zeros(n, dtype=acc_dtype, device=h.device)
    weighted_z = torch.zeros(n, dtype=acc_dtype, device=h.device) if want_entropy else None
    expect = torch.zeros(n, h.shape[1], dtype=acc_dtype, device=h.device) if want_grad else None
    label_rows = torch.zeros(n, h.shape[1], dtype=acc_dtype, device=h.device) if want_grad else None
    for start, w in _slices(weight, h.device, h.dtype, vocab_chunk):
        stop = start + w.shape[0]
        for r in range(0, n, row_tile):
            sl = slice(r, min(n, r + row_tile))
            z = (h[sl] @ w.t()).to(acc_dtype)  # logits in the input dtype, reduced in fp32
            if softcap:
                t = torch.tanh(z / softcap)
                z, slope = softcap * t, 1.0 - t * t  # the capped logits and the cap's derivative
            new_peak = torch.maximum(peak[sl], z.amax(-1))
            rescale = torch.exp(peak[sl] - new_peak)
            p = torch.exp(z - new_peak.unsqueeze(-1))
            total[sl] = total[sl] * rescale + p.sum(-1)
            if want_entropy:
                weighted_z[sl] = weighted_z[sl] * rescale + (p * z).sum(-1)
            here = (y[sl] >= start) & (y[sl] < stop)
            local = torch.where(here, y[sl] - start, 0)
            picked[sl] += torch.where(here, z.gather(-1, local.unsqueeze(-1)).squeeze(-1), 0.0)
            peak[sl] = new_peak
            if want_grad:
                weighted = p * slope if softcap else p
                expect[sl] = expect[sl] * rescale.unsqueeze(-1) + (weighted.to(w.dtype) @ w).to(acc_dtype)
                label_w = w.index_select(0, local).to(acc_dtype)
                if softcap:
                    label_w = label_w * slope.gather(-1, local.unsqueeze(-1))
                label_rows[sl] += torch.where(here.unsqueeze(-1), label_w, 0.0)
            del z, p
    lse = peak + torch.log(total)
    grad = None
    if want_grad:
        grad = label_rows.sub_(expect.div_(total.unsqueeze(-1)))
    return picked, lse, grad, weighted_z / total if want_entropy else None


def _slices(weight: torch.Tensor, device: torch.device, dtype: torch.dtype, chunk: int):
    """(first row, [rows, H] slice on ``device`` in ``dtype``) over ``weight``; host slices are copied on a side
    stream, the next one while the current one is in use."""
    v = weight.shape[0]
    if weight.device == device or device.type != "cuda":
        for start in range(0, v, chunk):
            yield start, weight[start:start + chunk].to(dtype)
        return
    current, side = torch.cuda.current_stream(device), _side_stream(device)

    def fetch(start):
        buf = torch.empty((min(chunk, v - start), weight.shape[1]), dtype=weight.dtype, device=device)
        side.wait_stream(current)  # the buffer's memory may have been freed by work queued on this stream
        with torch.cuda.stream(side):
            buf.copy_(weight[start:start + chunk], non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        return buf, done

    pending = fetch(0)
    for start in range(0, v, chunk):
        buf, done = pending
        if start + chunk < v:
            pending = fetch(start + chunk)
        current.wait_event(done)
        yield start, buf.to(dtype)


_STREAMS: dict = {}


def _side_stream(device: torch.device):
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]
