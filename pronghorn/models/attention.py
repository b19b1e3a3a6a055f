"""Grouped-query self-attention through torch SDPA, with causal, padding and sliding-window masks.

The family's parts (``cfg.parts``) set the score scale, tanh soft-capping of the scores (Gemma 2, through
``kernels.softcapped_attention``, which takes its mask as a :class:`KeyVisibility` rather than a dense one),
partial rotary embeddings (Phi-3 / Phi-4-mini) and the q/k norms' offset."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import apply_rope, fusable_projections, lora_qkv, softcapped_attention
from ..kernels.policy import DEFAULT_POLICY, KernelPolicy
from .config import ModelConfig
from .kv_cache import KVCache
from .linear import Linear
from .norm import RMSNorm

def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Per-token sequence index [B, T] of a packed batch: a new sequence starts wherever a position does not
    exceed the one before it (``position_ids[t] <= position_ids[t-1]``)."""
    starts = position_ids[:, 1:] <= position_ids[:, :-1]
    return F.pad(starts.long(), (1, 0)).cumsum(-1)


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    q_len: int,
    kv_len: int,
    window: int | None,
    device: torch.device,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask [B|1, 1, q_len, kv_len] (True = may attend), or None when plain causal suffices.

    Queries are the last ``q_len`` of ``kv_len`` positions. ``attention_mask`` [B, kv_len] marks real
    tokens (1) and padding (0). A query with no visible key (a padding row) is let see every key so
    SDPA stays finite; its output is never used.

    ``position_ids`` [B, q_len] (padding-free packed batches): when there is no past (``q_len == kv_len``),
    no padding, and some row's positions restart (see :func:`sequence_ids`), a document mask is added so
    a query only sees keys of its own sequence. Detecting a restart costs one host sync (``.any()``); the
    mask is only built for packed batches, so the ``is_causal`` fast path stays for ordinary ones.
    """
    padded, docs = _padding_and_documents(attention_mask, q_len, kv_len, device, position_ids)
    return _dense_mask(attention_mask, padded, docs, q_len, kv_len, window, device)


def _padding_and_documents(attention_mask, q_len: int, kv_len: int, device: torch.device, position_ids):
    """(whether ``attention_mask`` pads any token, the per-token sequence ids of packed rows or None): a host
    sync for each question asked."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    docs = None
    if position_ids is not None and not padded and q_len == kv_len and q_len > 1:
        docs = sequence_ids(position_ids.to(device))
        if not bool(docs[:, -1].any()):  # host sync: any restart in any row?
            docs = None
    return padded, docs


def _dense_mask(attention_mask, padded: bool, docs, q_len: int, kv_len: int, window: int | None,
                device: torch.device) -> torch.Tensor | None:
    if docs is None and not padded and window is None and (q_len == kv_len or q_len == 1):
        return None
    past = kv_len - q_len
    q_idx = torch.arange(past, kv_len, device=device)[:, None]
    k_idx = torch.arange(kv_len, device=device)[None, :]
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)
    allowed = allowed[None, None]
    if docs is not None:
        allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])
    if padded:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    return allowed | ~allowed.any(-1, keepdim=True)


class KeyVisibility(NamedTuple):
    """Which keys a query sees, as the soft-capped attention kernel takes it (no dense [B, 1, q, kv] mask):
    causal over the last ``q_len`` of ``kv_len`` positions, a sliding ``window`` or None, ``key_padding``
    [B, kv_len] (1 = real token) or None, and ``seq_ids`` [B, T] (packed rows: the sequence of each token,
    :func:`sequence_ids`) or None. See :func:`attention_visibility`."""

    window: int | None
    key_padding: torch.Tensor | None
    seq_ids: torch.Tensor | None = None

    def dense(self, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor | None:
        """The same keys as :func:`build_attention_mask`'s dense mask (for a layer without the cap)."""
        kp = self.key_padding
        return _dense_mask(kp, kp is not None, self.seq_ids, q_len, kv_len, self.window, device)


def attention_visibility(
    attention_mask: torch.Tensor | None,
    q_len: int,
    kv_len: int,
    window: int | None,
    device: torch.device,
    position_ids: torch.Tensor | None = None,
) -> KeyVisibility | torch.Tensor | None:
    """:func:`build_attention_mask` for soft-capped layers: the same keys as a :class:`KeyVisibility` (packed
    rows as their sequence ids). One difference, in outputs nothing uses: a padding query that sees no key gets
    zeros here, where the dense mask lets it see every key."""
    padded, docs = _padding_and_documents(attention_mask, q_len, kv_len, device, position_ids)
    return KeyVisibility(window, attention_mask.to(device) if padded else None, docs)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
         scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention with GQA (k/v have fewer heads than q); ``scale`` None: head_dim ** -0.5.
    The backend is torch's choice: on Hopper (torch 2.11) that is cuDNN's fused attention at training shapes,
    as fast as any backend forced first (benchmarks/kernel_speed.py --ops attention, docs/benchmarks.md session 25)."""
    return _sdpa(q, k, v, mask, causal, {} if scale is None else dict(scale=scale))


def _sdpa(q, k, v, mask, causal, kw):
    if q.shape[1] != k.shape[1]:
        b, hq, t, d = q.shape
        if t == 1 and mask is not None and mask.shape[1] == 1:
            # one query per head (decoding): the heads sharing a k/v head become that head's query rows, so
            # any SDPA backend takes the masked call without repeating k/v (a GQA mask often means the math one)
            out = F.scaled_dot_product_attention(q.reshape(b, k.shape[1], hq // k.shape[1], d), k, v, attn_mask=mask,
                                                 **kw)
            return out.reshape(b, hq, 1, v.shape[-1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True, **kw)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **kw)


class Attention(nn.Module):
    kernel_policy: KernelPolicy = DEFAULT_POLICY  # kernels/policy.py; DecoderForCausalLM.set_kernel_policy

    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype=None, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.window_of(layer_idx)
        self.rope = cfg.rope_of(layer_idx)
        parts = cfg.parts
        self.scale, self.softcap, self.rotary_dim = parts.attn_scale, parts.attn_softcap, parts.rotary_dim
        kw = dict(dtype=dtype, device=device)
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, cfg.qkv_bias, **kw)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, cfg.qkv_bias, **kw)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, cfg.qkv_bias, **kw)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, cfg.o_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, parts.norm_offset, **kw)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, parts.norm_offset, **kw)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masks: dict, cache: KVCache | None,
        output_unused: bool = False,
    ) -> torch.Tensor:
        """``output_unused``: the values are thrown away (a replay for the backward): o_proj skips its matmul."""
        b, t, _ = x.shape
        fused = fusable_projections((self.q_proj, self.k_proj, self.v_proj), self.training)
        if fused is not None:
            q, k, v = lora_qkv(x, *fused, self.kernel_policy)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rotate(q.transpose(1, 2), k.transpose(1, 2), cos[self.rope], sin[self.rope])
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        mask = masks[self.window]
        if isinstance(mask, KeyVisibility) and not self.softcap:  # a cap switched off on a soft-capped model
            mask = mask.dense(t, k.shape[2], q.device)
        causal = mask is None and t > 1 and t == k.shape[2]
        if isinstance(mask, KeyVisibility):  # the soft-capped kernel's form of the mask (attention_visibility)
            out = softcapped_attention(q, k, v, None, True, self.softcap, self.scale, self.kernel_policy, *mask)
        elif self.softcap:  # a dense mask: the static cache's decode masks
            out = softcapped_attention(q, k, v, mask, causal, self.softcap, self.scale, self.kernel_policy)
        else:
            out = sdpa(q, k, v, mask, causal, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim), output_unused=output_unused)


    def _rotate(self, q, k, cos, sin):
        """RoPE on the whole head, or (partial rotary) on its first ``rotary_dim`` features only."""
        r = self.rotary_dim
        if r is None or r == self.head_dim:
            return apply_rope(q, k, cos, sin, self.kernel_policy)
        q_rot, k_rot = apply_rope(q[..., :r].contiguous(), k[..., :r].contiguous(), cos, sin, self.kernel_policy)
        return torch.cat((q_rot, q[..., r:]), -1), torch.cat((k_rot, k[..., r:]), -1)
