"""Exact-size pinned host buffers for large offloaded activations.

PyTorch's pinned-memory allocator rounds every block up to a power of two (a 2.1 GiB layer input takes
4 GiB), which at long context exhausts the host long before the activations themselves would. Blocks larger
than :data:`EXACT_ABOVE` bytes come instead from plain host memory of exactly the needed size, page-locked
with ``cudaHostRegister``, and are kept in a pool for the next step (registration is slow, reuse is free).
Smaller blocks stay with PyTorch's caching allocator.

Every copy into or out of a pooled buffer must run on one CUDA stream (models/recompute.py's side stream): a
buffer handed back after its last copy was queued can then be reused at once by the next queued copy.
"""

from __future__ import annotations

import torch

EXACT_ABOVE = 256 * 2**20
_free: dict[int, list[torch.Tensor]] = {}  # nbytes -> registered uint8 buffers not in use


class Lease:
    """A pooled buffer lent out; handed back to the pool when released or garbage-collected."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer

    def release(self) -> None:
        if self.buffer is not None:
            _free.setdefault(self.buffer.numel(), []).append(self.buffer)
            self.buffer = None

    def __del__(self):
        self.release()


def _register(nbytes: int) -> torch.Tensor:
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.2f} GiB failed with CUDA error {int(err)}")
    return buffer


def pinned_empty(shape, dtype: torch.dtype) -> tuple[torch.Tensor, Lease | None]:
    """An uninitialized pinned host tensor and, when it comes from the exact-size pool, its lease (keep the
    lease until the tensor's last copy is queued, then ``release`` it)."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if nbytes <= EXACT_ABOVE:
        return torch.empty(shape, dtype=dtype, pin_memory=True), None
    pool = _free.get(nbytes)
    buffer = pool.pop() if pool else _register(nbytes)
    return buffer.view(dtype).view(shape), Lease(buffer)


def pooled_bytes() -> int:
    """Bytes held by pooled buffers not in use."""
    return sum(n * len(bufs) for n, bufs in _free.items())


def release_pooled() -> None:
    """Unregister and free every pooled buffer not in use (after a long-context run, say)."""
    if _free:
        torch.cuda.synchronize()
    for bufs in _free.values():
        for buffer in bufs:
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
    _free.clear()
