"""Attention with tanh soft-capped scores (Gemma 2): softmax(c * tanh(q k^T * scale / c) + mask) v.

SDPA has no soft-capping, so this is its own op. Only the plain PyTorch reference exists so far (it builds the
[B, H, q, kv] scores, as transformers' eager attention does); a GPU fast path (FlexAttention with a score_mod,
or a Triton kernel) would go behind the same function.
"""

from __future__ import annotations

import torch


def softcapped_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                                   causal: bool, softcap: float, scale: float | None = None) -> torch.Tensor:
    """q [B, Hq, Tq, D], k/v [B, Hk, Tk, D] (Hk divides Hq); ``mask`` bool [B|1, 1, Tq, Tk] (True = may attend)
    or None with ``causal`` (the last Tq of Tk positions) -> [B, Hq, Tq, Dv]. Softmax in fp32, as HF's eager path."""
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and causal:
        tq, tk = q.shape[2], k.shape[2]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                         softcap: float, scale: float | None = None) -> torch.Tensor:
    """The single entry point model code calls (the reference on every device for now)."""
    return softcapped_attention_reference(q, k, v, mask, causal, softcap, scale)
