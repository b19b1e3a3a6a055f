"""The fused loss's count of non-ignored labels, fetched to the host early so that the host never waits for it.

The fused head + cross-entropy (``linear_cross_entropy_triton``) drops ignored rows before its matmuls, and a
cuBLAS call needs its row count on the host. Read at the loss, that count is a wait on the GPU: the host, until
then ahead of the GPU by as much as the whole forward, stops until the GPU has run every layer, then launches the
loss's small kernels one at a time onto an idle GPU. Started at the top of the model's forward
(``DecoderForCausalLM.forward`` does), the count's copy lands as soon as the GPU starts the forward: a host that
reaches the loss before that waits with every layer still queued behind the copy, so the GPU never runs dry.

The values are the same either way: the count of labels not equal to ``ignore_index`` and the stable argsort of
the ignore mask (valid rows first, in their order).
"""

from __future__ import annotations

import torch

from .linear_cross_entropy import IGNORE_INDEX


class ValidRows:
    """For flat ``labels`` [N]: ``order`` (device, valid rows first) now, ``count()`` (host int) when asked."""

    def __init__(self, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
        self.labels, self.ignore_index = labels, ignore_index
        ignored = (labels == ignore_index).to(torch.uint8)
        count = labels.numel() - ignored.sum()
        self._copied = None
        if labels.is_cuda:  # copy to pinned host memory without blocking; the event says when it has landed
            self._count = torch.empty((), dtype=count.dtype, pin_memory=True)
            self._count.copy_(count, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._count = count
        self.order = torch.argsort(ignored, stable=True)  # enqueued behind the copy: the GPU works while we wait

    def count(self) -> int:
        """The number of valid rows (waits for the copy if it has not landed yet: the only host sync)."""
        if self._copied is not None:
            self._copied.synchronize()
        return int(self._count)

    def matches(self, labels: torch.Tensor, ignore_index: int) -> bool:
        """Whether these rows were counted for ``labels`` (the same memory and shape) and ``ignore_index``."""
        mine = self.labels
        return (ignore_index == self.ignore_index and labels.shape == mine.shape and labels.device == mine.device
                and labels.data_ptr() == mine.data_ptr() and labels.stride() == mine.stride())
