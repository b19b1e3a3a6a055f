"""Per-token log-probabilities of given labels from hidden states and the output head, without [N x V] logits.

``hidden`` [N, H], ``weight`` [V, H] (the lm_head), ``labels`` [N] already aligned (the caller shifts).
Returns fp32 (fp64 for fp64 inputs) ``log_softmax(softcap(hidden @ weight^T))[i, labels[i]]`` for every row, 0 where the label is
``ignore_index``; ``softcap(x) = c * tanh(x / c)`` for a family with soft-capped final logits (Gemma 2; Gemma 3
when its config sets one), the identity without. This is what preference losses (DPO, ORPO, KTO, SimPO) need: summed or averaged
log-probs of a completion, for the policy (with gradients) and the reference (without). With ``entropy=True`` it
also returns each row's entropy ``-sum_v p_v log p_v`` of that distribution (GRPO's ``entropy`` metric), taken from
the same logits chunks (no gradient; a few elementwise operations, no extra matmul).

How (:class:`LinearLogprobsFunction`): ignored rows are dropped before any matmul; the rest run in chunks
of rows, so at most one [rows, V] logits chunk exists at a time. Each chunk's logits are computed in the
input dtype (as an unfused head would), the log-sum-exp is accumulated in fp32.

- **Frozen head** (LoRA / QLoRA, the usual case): the gradient with respect to ``hidden`` is produced
  during the forward: for row i, d logp_i / d hidden_i = (onehot - softmax_i) @ W, a [rows, H] matrix that
  does not depend on the upstream gradient; backward only scales its rows by ``grad_output``. One head
  matmul pair per chunk, no recompute, and nothing of size V is kept.
- **Trainable head**: dW = sum_i g_i (onehot - softmax_i)^T h_i needs the upstream gradient g, so the
  forward keeps only the per-row log-sum-exp and the backward recomputes each chunk's logits.
- Without any gradient (the reference model under ``no_grad``): the forward only, nothing saved.

Row math: on CUDA the CE row kernel of the fused head (``linear_cross_entropy_triton.ce_rows``: online fp32
max/sum over vocab blocks, writes ``lse - x[label]`` per row and, when asked, ``softmax - onehot`` in place and
the row's entropy ``lse - sum softmax * x``, whose running sum rides along the first pass) is reused; on the CPU the same quantities come from torch ops in fp32. Both cap the logits in fp32 and
multiply ``softmax - onehot`` by the cap's derivative ``1 - tanh^2``. Reference for the tests:
:func:`linear_logprobs_reference` (full logits + cap + ``log_softmax`` + ``gather``; with ``entropy``, its
entropy from the same full logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear_cross_entropy import IGNORE_INDEX
from .logits_chunks import chunk_rows
from .policy import DEFAULT_POLICY, KernelPolicy
from .triton_support import use_triton

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linear_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              ignore_index: int = IGNORE_INDEX, softcap: float | None = None, entropy: bool = False
                              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain version: full logits (input dtype), fp32 soft-cap and log_softmax, gather; 0 at ignored rows. With
    ``entropy``: (log-probs, ``-sum p log p`` per row, 0 at ignored rows, no gradient)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = F.linear(hidden, weight).to(acc)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logp = logits.log_softmax(-1)
    keep = labels != ignore_index
    picked = logp.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(keep, picked, picked.new_zeros(()))
    if not entropy:
        return picked
    ent = -(logp.exp() * logp).sum(-1).detach()
    return picked, torch.where(keep, ent, ent.new_zeros(()))


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype: fp32, or fp64 for fp64 inputs (the precision tests check the algebra in)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(_acc_dtype(t))


def kept_rows(labels: torch.Tensor, ignore_index: int, keep_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the rows whose label is not ``ignore_index``. Without ``keep_rows`` they are found with
    ``nonzero``: one host sync, as the matmul shapes need their count. ``keep_rows``: the same indices computed
    by the caller (e.g. on the host, from the batch before it was copied to the device): no sync; checked
    against ``labels`` on the device, asynchronously."""
    keep = labels != ignore_index
    if keep_rows is None:
        return keep.nonzero().squeeze(-1)
    idx = keep_rows.to(labels.device, torch.long)
    torch._assert_async((keep.sum() == idx.numel()) & keep.index_select(0, idx).all(),
                        "keep_rows are not the rows of labels that are not ignore_index")
    return idx


def _rows_torch(logits: torch.Tensor, labels: torch.Tensor, write_grad: bool, softcap: float | None,
                entropy: torch.Tensor | None = None) -> torch.Tensor:
    """Per row: ``-logp`` (= lse - x[label], fp32, x the capped logits); with ``write_grad`` the rows become
    (softmax - onehot) times the cap's derivative: d(-logp) / d logits. ``entropy`` [rows]: gets each row's
    ``lse - sum softmax * x``."""
    x = _acc(logits)
    if softcap:
        t = torch.tanh(x / softcap)
        x = softcap * t
    lse = torch.logsumexp(x, -1)
    neg = lse - x.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if entropy is None and not write_grad:
        return neg
    g = torch.exp(x - lse.unsqueeze(-1))  # softmax
    if entropy is not None:
        entropy.copy_(lse - (g * x).sum(-1))
    if write_grad:
        g.scatter_add_(-1, labels.unsqueeze(-1), g.new_full((labels.numel(), 1), -1.0))
        if softcap:
            g.mul_(1.0 - t * t)
        logits.copy_(g)
    return neg


def _rows(logits: torch.Tensor, labels: torch.Tensor, write_grad: bool, triton_rows: bool,
          softcap: float | None, entropy: torch.Tensor | None = None) -> torch.Tensor:
    if not triton_rows:
        return _rows_torch(logits, labels, write_grad, softcap, entropy)
    from .linear_cross_entropy_triton import ce_rows

    neg = torch.empty(labels.numel(), dtype=torch.float32, device=logits.device)
    ce_rows(logits, labels, neg, IGNORE_INDEX, softcap, write_grad, entropy=entropy)
    return neg


def _dweight_add(acc: torch.Tensor | None, dlogits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """acc (fp32) + dlogits^T @ h, with fp32 accumulation of the product."""
    if dlogits.is_cuda and dlogits.dtype != torch.float32:
        if acc is None:
            return torch.mm(dlogits.t(), h, out_dtype=torch.float32)
        return torch.addmm(acc, dlogits.t(), h, out_dtype=torch.float32, out=acc)
    part = _acc(dlogits.t() @ h)
    return part if acc is None else acc.add_(part)


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, need_dh, need_dw, triton_rows, keep_rows,
                softcap, want_entropy):
        N, H = hidden.shape
        V = weight.shape[0]
        idx = kept_rows(labels, ignore_index, keep_rows)
        n = idx.numel()
        y = labels.index_select(0, idx)
        if n:
            torch._assert_async(((y >= 0) & (y < V)).all(), "linear_logprobs: a label is outside [0, vocab)")
        out = torch.zeros(N, dtype=_acc_dtype(hidden), device=hidden.device)
        ent = torch.zeros(N if want_entropy else 0, dtype=out.dtype, device=hidden.device)
        ent_c = torch.empty(n if want_entropy else 0, dtype=torch.float32 if triton_rows else out.dtype,
                            device=hidden.device)
        rows = chunk_rows(n, V, hidden.element_size(), chunk_size)
        grads_now = need_dh and not need_dw  # frozen head: d hidden in the forward
        dh_c = torch.empty(n, H, dtype=hidden.dtype, device=hidden.device) if grads_now else None
        buf = torch.empty(min(rows, n), V, dtype=hidden.dtype, device=hidden.device)
        for s in range(0, n, rows):
            e = min(s + rows, n)
            h_c = hidden.index_select(0, idx[s:e])
            logits = buf[: e - s]
            torch.mm(h_c, weight.t(), out=logits)
            neg = _rows(logits, y[s:e], grads_now, triton_rows, softcap, ent_c[s:e] if want_entropy else None)
            out.index_copy_(0, idx[s:e], -neg)
            if grads_now:
                torch.mm(logits, weight, out=dh_c[s:e])  # (softmax - onehot) @ W = -d logp / d h
        del buf
        if want_entropy:
            ent.index_copy_(0, idx, ent_c.to(ent.dtype))
        ctx.mark_non_differentiable(labels, ent)
        ctx.mode = "scale" if grads_now else "recompute" if need_dw else "none"
        ctx.shape, ctx.rows, ctx.triton_rows, ctx.weight_dtype = (N, H), rows, triton_rows, weight.dtype
        ctx.softcap = softcap
        if ctx.mode == "scale":
            ctx.save_for_backward(dh_c, idx)
        elif ctx.mode == "recompute":
            ctx.save_for_backward(hidden, weight, y, idx)
        return out, ent

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy):
        N, H = ctx.shape
        if ctx.mode == "none":
            return (None,) * 11
        g = _acc(grad_out)
        if ctx.mode == "scale":
            dh_c, idx = ctx.saved_tensors
            scale = -g.index_select(0, idx).unsqueeze(-1)
            dh = torch.zeros(N, H, dtype=dh_c.dtype, device=dh_c.device)
            dh.index_copy_(0, idx, (_acc(dh_c) * scale).to(dh_c.dtype))
            return (dh,) + (None,) * 10
        hidden, weight, y, idx = ctx.saved_tensors
        need_dh = ctx.needs_input_grad[0]
        n, rows = idx.numel(), ctx.rows
        dh = torch.zeros(N, H, dtype=hidden.dtype, device=hidden.device) if need_dh else None
        dw = None
        buf = torch.empty(min(rows, n), weight.shape[0], dtype=hidden.dtype, device=hidden.device)
        for s in range(0, n, rows):
            e = min(s + rows, n)
            h_c = hidden.index_select(0, idx[s:e])
            logits = buf[: e - s]
            torch.mm(h_c, weight.t(), out=logits)
            _rows(logits, y[s:e], True, ctx.triton_rows, ctx.softcap)  # logits <- -d logp / d logits
            scale = -g.index_select(0, idx[s:e]).unsqueeze(-1)  # d loss / d logits = scale * (softmax - onehot)
            if need_dh:
                dh.index_copy_(0, idx[s:e], (_acc(logits @ weight) * scale).to(hidden.dtype))
            dw = _dweight_add(dw, logits, (_acc(h_c) * scale).to(h_c.dtype))
        if dw is None:
            dw = torch.zeros(weight.shape, dtype=_acc_dtype(weight), device=weight.device)
        return (dh, dw.to(ctx.weight_dtype)) + (None,) * 9


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None,
                    triton_rows: bool | None = None, keep_rows: torch.Tensor | None = None,
                    policy: KernelPolicy = DEFAULT_POLICY, softcap: float | None = None, entropy: bool = False
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 per-row log-prob of ``labels`` under ``softmax(softcap(hidden @ weight^T))`` (0 at ignored rows),
    chunked; ``softcap`` (the family's final logit cap, None: none) caps the logits as ``c * tanh(x / c)``.

    ``chunk_size`` caps the rows per logits chunk (default: a ~1 GiB chunk). ``triton_rows`` picks the Triton
    row kernel (default: on CUDA tensors when Triton is importable). A frozen ``weight`` on another device than
    ``hidden`` (a tied table kept on the host) is read slice by slice: :func:`.streamed_logprobs`. ``keep_rows``:
    the indices of the rows not ignored, when the caller knows them (no host sync; :func:`kept_rows`).
    ``entropy``: return (log-probs, the entropy of each row's distribution: 0 at ignored rows, no gradient)."""
    if weight.device != hidden.device and not weight.requires_grad:
        from .streamed_logprobs import streamed_logprobs

        return streamed_logprobs(hidden, weight, labels, ignore_index, keep_rows=keep_rows, softcap=softcap,
                                 entropy=entropy)
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)  # differentiable cast (autocast-style mixed dtypes)
    if triton_rows is None:
        triton_rows = not policy.reference and use_triton(hidden, weight, labels) and hidden.dtype in _TRITON_DTYPES
    grad = torch.is_grad_enabled()
    out, ent = LinearLogprobsFunction.apply(hidden, weight, labels, ignore_index, chunk_size,
                                            grad and hidden.requires_grad, grad and weight.requires_grad, triton_rows,
                                            keep_rows, softcap, entropy)
    return (out, ent) if entropy else out
