"""Rotary position embedding: cos/sin tables from inverse frequencies, and the rotation of q and k."""

from __future__ import annotations

import torch

from .policy import DEFAULT_POLICY, KernelPolicy
from .triton_support import use_triton


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [batch, seq, head_dim] for integer ``position_ids`` [batch, seq], computed in fp32."""
    freqs = position_ids[..., None].to(torch.float32) * inv_freq.to(device=position_ids.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] by cos/sin [B, T, D] (the half-split layout of HF checkpoints)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, policy: KernelPolicy = DEFAULT_POLICY
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k together; the single entry point model code calls (Triton kernel on CUDA)."""
    if not policy.reference and use_triton(q, k, cos, sin):
        from .rope_triton import RoPEFunction

        return RoPEFunction.apply(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)
