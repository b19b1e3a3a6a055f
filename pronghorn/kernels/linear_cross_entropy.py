"""Output head + cross-entropy without materialising logits for ignored positions.

``hidden`` [N, H] and ``labels`` [N] are already aligned (the caller shifts). Rows whose label is
``ignore_index`` are dropped before the matmul; the rest run in chunks so the [tokens x vocab] logits
never exist all at once. ``num_items`` (tokens counted over a whole accumulated batch) makes
gradient accumulation exact: each micro-batch returns sum / num_items.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .policy import DEFAULT_POLICY, KernelPolicy
from .triton_support import use_triton

IGNORE_INDEX = -100
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Mean (over ``num_items`` if given, else over the non-ignored tokens) cross-entropy of hidden @ weight^T."""
    keep = labels != ignore_index
    h, y = hidden[keep], labels[keep]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # at least fp32
    total = hidden.new_zeros((), dtype=acc)
    for start in range(0, h.shape[0], chunk_size):
        logits = F.linear(h[start : start + chunk_size], weight).to(acc)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        total = total + F.cross_entropy(logits, y[start : start + chunk_size], reduction="sum")
    if num_items is None:
        num_items = keep.sum()
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(total.device)
    return total / num_items


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    chunk_size: int | None = None,
    policy: KernelPolicy = DEFAULT_POLICY,
    valid_rows=None,
) -> torch.Tensor:
    """The single entry point model code calls for the training loss. ``chunk_size``: rows of logits at a time
    (None: the fused path's ~1 GiB buffer, the reference's 4096 rows). ``valid_rows``: a ``ValidRows`` of
    ``labels`` started earlier (``kernels/valid_rows.py``), for the fused path (the others do not need it).

    CUDA tensors take the fused chunked Triton path (``linear_cross_entropy_triton``), anything else the
    PyTorch reference; both compute the same function. A frozen head weight on the host while ``hidden`` is on
    a GPU (a tied table kept there) is streamed slice by slice (``streamed_logprobs``): minus the summed
    log-probs over the same count."""
    if _streamed(weight, hidden.device):
        from .streamed_logprobs import streamed_logprobs

        logp = streamed_logprobs(hidden, weight, labels, ignore_index, softcap=softcap)
        count = (labels != ignore_index).sum() if num_items is None else num_items
        if isinstance(count, torch.Tensor):
            count = count.to(logp.device)
        return -logp.sum() / count
    if fused_loss_path(weight, labels, hidden.device, policy) and use_triton(hidden) and hidden.dtype in _TRITON_DTYPES:
        from .linear_cross_entropy_triton import linear_cross_entropy_triton

        return linear_cross_entropy_triton(hidden, weight, labels, num_items, ignore_index, softcap, chunk_size,
                                           valid_rows=valid_rows)
    return linear_cross_entropy_reference(hidden, weight, labels, num_items, ignore_index, softcap, chunk_size or 4096)


def _streamed(weight: torch.Tensor, device: torch.device) -> bool:
    """A frozen head weight away from the hidden states (a tied table kept on the host): streamed."""
    return weight.device != device and not weight.requires_grad


def fused_loss_path(weight: torch.Tensor, labels: torch.Tensor, device: torch.device,
                    policy: KernelPolicy = DEFAULT_POLICY) -> bool:
    """Whether ``linear_cross_entropy`` of hidden states on ``device`` (of a kernel dtype) takes the fused Triton
    path, the one that reads a ``ValidRows``: asked by the model before its layers run, where it starts one only
    for this path."""
    return not policy.reference and weight.device == device and use_triton(weight, labels)
