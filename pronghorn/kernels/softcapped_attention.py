"""Attention with tanh soft-capped scores (Gemma 2): softmax(c * tanh(q k^T * scale / c) + mask) v.

SDPA has no soft-capping, so this is its own op: a plain PyTorch reference (it builds the [B, H, q, kv] scores, as
transformers' eager attention does) and a FlashAttention-style Triton kernel (``softcapped_attention_triton``)
behind one function. Which keys a query sees is given either as a dense bool ``mask`` (the reference only) or,
cheaply, as ``causal`` + an optional sliding ``window`` + an optional ``key_padding`` [B, Tk] (HF's attention
mask) + optional ``seq_ids`` [B, T] (packed rows: a query sees keys of its own sequence), which the kernel takes.
"""

from __future__ import annotations

import torch

from .policy import DEFAULT_POLICY, KernelPolicy
from .triton_support import use_triton

MAX_HEAD_DIM = 256  # the kernel's widest head (Gemma's 256); wider ones take the reference


def visibility_mask(tq: int, tk: int, causal: bool, window: int | None, key_padding: torch.Tensor | None,
                    device: torch.device, seq_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """The dense bool mask [B|1, 1, tq, tk] (True = may attend) of ``causal`` / ``window`` / ``key_padding`` /
    ``seq_ids``, or None when every key is visible. Queries are the last ``tq`` of ``tk`` positions; key j is
    visible to the query at position p when j <= p (causal), p - window < j (window), ``key_padding[b, j]`` is
    nonzero and ``seq_ids[b, j] == seq_ids[b, p]`` (packed rows, tq == tk)."""
    if not causal and window is None and key_padding is None and seq_ids is None:
        return None
    pos = torch.arange(tk - tq, tk, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (j <= pos)
    if window is not None:
        allowed = allowed & (j > pos - window)
    allowed = allowed[None, None]
    if key_padding is not None:
        allowed = allowed & key_padding.to(device).bool()[:, None, None, :]
    if seq_ids is not None:
        ids = seq_ids.to(device)
        allowed = allowed & (ids[:, None, -tq:, None] == ids[:, None, None, :])
    return allowed


def softcapped_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                                   causal: bool, softcap: float, scale: float | None = None,
                                   window: int | None = None, key_padding: torch.Tensor | None = None,
                                   seq_ids: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, Tq, D], k/v [B, Hk, Tk, D] (Hk divides Hq); ``mask`` bool [B|1, 1, Tq, Tk] (True = may attend)
    or additive (0 / -inf, added to the capped scores, as HF's eager path adds its mask), or None with
    ``causal`` / ``window`` / ``key_padding`` / ``seq_ids`` (see :func:`visibility_mask`) -> [B, Hq, Tq, Dv].
    Softmax in fp32, as HF's eager path. A query that sees no key gets zeros (as the kernel)."""
    if mask is not None and (window is not None or key_padding is not None or seq_ids is not None):
        raise ValueError("softcapped_attention: give a dense mask or window / key_padding / seq_ids, not both")
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = visibility_mask(q.shape[2], k.shape[2], causal, window, key_padding, q.device, seq_ids)
    additive = mask is not None and mask.is_floating_point()
    if additive:  # 0 / -inf (the static cache's decode masks)
        scores = scores + mask
    elif mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if mask is not None and not additive:
        probs = probs.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return torch.matmul(probs.to(q.dtype), v)


def kernel_runs(head_dim: int, device: torch.device, policy: KernelPolicy = DEFAULT_POLICY) -> bool:
    """Whether a training forward (no dense mask) of this head dim on ``device`` takes the Triton kernel rather
    than the reference: CUDA with Triton, head dims up to 256, not the reference policy. The meta device counts
    as CUDA (the memory plan's previews of GPU runs)."""
    from .triton_support import triton_available

    if policy.reference or head_dim > MAX_HEAD_DIM:
        return False
    return device.type == "meta" or (device.type == "cuda" and triton_available())


def _kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, key_padding, seq_ids) -> bool:
    """The Triton kernel's domain: CUDA fp16/bf16/fp32 tensors, no dense mask, head dims up to 256, v's head dim
    that of q and k."""
    tensors = (q, k, v, *(t for t in (key_padding, seq_ids) if t is not None))
    return (mask is None and use_triton(*tensors) and q.shape[-1] <= MAX_HEAD_DIM
            and q.shape[-1] == k.shape[-1] == v.shape[-1])


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                         softcap: float, scale: float | None = None, policy: KernelPolicy = DEFAULT_POLICY,
                         window: int | None = None, key_padding: torch.Tensor | None = None,
                         seq_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The single entry point model code calls (arguments as :func:`softcapped_attention_reference`).

    CUDA tensors without a dense ``mask`` take the Triton kernel (hand-written backward); a dense mask, any other
    device, or a reference ``policy`` takes the PyTorch reference.
    """
    if key_padding is not None and key_padding.shape != (q.shape[0], k.shape[2]):
        raise ValueError(f"softcapped_attention: key_padding has shape {tuple(key_padding.shape)}, expected "
                         f"[batch, keys] = {(q.shape[0], k.shape[2])}")
    if seq_ids is not None and (seq_ids.shape != (q.shape[0], q.shape[2]) or q.shape[2] != k.shape[2]):
        raise ValueError(f"softcapped_attention: seq_ids (packed rows, no past) have shape {tuple(seq_ids.shape)}, "
                         f"expected [batch, tokens] = {(q.shape[0], q.shape[2])} with as many keys as queries")
    if not policy.reference and _kernel_takes(q, k, v, mask, key_padding, seq_ids):
        from .softcapped_attention_triton import SoftcappedAttentionFunction

        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return SoftcappedAttentionFunction.apply(q, k, v, causal, softcap, scale, window, key_padding, seq_ids)
    return softcapped_attention_reference(q, k, v, mask, causal, softcap, scale, window, key_padding, seq_ids)
