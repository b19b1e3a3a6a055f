"""Inverse RoPE frequencies for each scaling scheme (default, linear, dynamic NTK, llama3, yarn, longrope).

Formulas follow the published schemes as Hugging Face transformers implements them, so checkpoints
trained with HF give the same positions here.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import CheckpointError, UnsupportedModelError


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def _llama3(inv_freq: torch.Tensor, rope: dict[str, Any]) -> torch.Tensor:
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: dict[str, Any], dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    base = rope["rope_theta"]
    original = rope.get("original_max_position_embeddings") or max_pos
    factor = rope.get("factor") or max_pos / original
    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rope.get("attention_factor")
    if attn is None:
        attn = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all else get_mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attn)


def _longrope(rope: dict[str, Any], dim: int, max_pos: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """Phi-3's LongRoPE ("su"): per-frequency divisors, the short ones up to the pretraining length and the long
    ones beyond it (``seq_len``: the longest position + 1), and one attention scaling from the length ratio."""
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or max_pos / original
    attn = rope.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = rope["long_factor"] if seq_len and seq_len > original else rope["short_factor"]
    if len(ext) != dim // 2:
        raise CheckpointError(f"rope scaling longrope: {len(ext)} factors for {dim // 2} rotary frequencies")
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(ext, dtype=torch.float32) * rope["rope_theta"] ** shape), float(attn)


def rope_inv_freq(rope: dict[str, Any], head_dim: int, max_pos: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] fp32, attention scaling) for a normalised rope dict.

    ``seq_len`` matters only for dynamic NTK scaling, whose base grows once positions pass ``max_pos``, and for
    longrope, whose long factors apply past the original length.
    """
    kind = rope["rope_type"]
    theta = rope["rope_theta"]
    if kind == "default":
        return _base_inv_freq(theta, head_dim), 1.0
    if kind == "linear":
        return _base_inv_freq(theta, head_dim) / rope["factor"], 1.0
    if kind == "llama3":
        return _llama3(_base_inv_freq(theta, head_dim), rope), 1.0
    if kind == "dynamic":
        seq_len = max(seq_len or max_pos, max_pos)
        factor = rope["factor"]
        base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return _base_inv_freq(base, head_dim), 1.0
    if kind == "yarn":
        return _yarn(rope, head_dim, max_pos)
    if kind == "longrope":
        return _longrope(rope, head_dim, max_pos, seq_len)
    raise UnsupportedModelError(f"rope_type {kind!r} is not supported (default, linear, dynamic, llama3, yarn, "
                                "longrope)")
