"""NEFTune (Jain et al., 2023): uniform noise on the input embeddings while training.

The noise is ``uniform(-1, 1) * alpha / sqrt(seq_len * hidden)`` per element, added to the output of
``model.get_input_embeddings()`` through a forward hook (TRL's formula; ``seq_len`` is the batch's padded
length). Only in training mode: ``model.eval()`` (and generation) sees the plain embeddings. The decoder is
not changed; :func:`deactivate_neftune` removes the hook.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

__all__ = ["activate_neftune", "deactivate_neftune", "neftune", "neftune_hook"]

_HANDLE = "_pronghorn_neftune_handle"


def neftune_hook(alpha: float):
    """A forward hook for an embedding module that adds NEFTune noise in training mode."""

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.zeros_like(output).uniform_(-scale, scale)

    return hook


def activate_neftune(model: nn.Module, alpha: float) -> nn.Module:
    """Add NEFTune noise of strength ``alpha`` (e.g. 5) to ``model``'s input embeddings while it trains.
    Replaces an earlier activation; returns ``model``."""
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"neftune_noise_alpha must be a positive number, got {alpha!r}")
    deactivate_neftune(model)
    embeddings = model.get_input_embeddings()
    setattr(model, _HANDLE, embeddings.register_forward_hook(neftune_hook(float(alpha))))
    return model


def deactivate_neftune(model: nn.Module) -> nn.Module:
    """Remove the NEFTune hook (a no-op when there is none); returns ``model``."""
    handle = getattr(model, _HANDLE, None)
    if handle is not None:
        handle.remove()
        delattr(model, _HANDLE)
    return model


@contextlib.contextmanager
def neftune(model: nn.Module, alpha: float | None) -> Iterator[nn.Module]:
    """Within the block, train ``model`` with NEFTune noise (``alpha`` None or 0: unchanged)."""
    if not alpha:
        yield model
        return
    activate_neftune(model, alpha)
    try:
        yield model
    finally:
        deactivate_neftune(model)
