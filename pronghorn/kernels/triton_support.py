"""When the Triton fast path may run, and launch-size helpers shared by the kernels.

Dispatch is by device: a CUDA tensor with Triton importable takes the kernel; anything else takes the
PyTorch reference. Kernel modules (``*_triton.py``) are imported only on that path, so ``import pronghorn``
never needs Triton. Tests run the kernels on the CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor is on a CUDA device and Triton is importable."""
    return all(t.is_cuda for t in tensors) and triton_available()


def row_block(n: int, max_block: int = 65536) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that keeps one row of ``n`` elements in registers."""
    block = 1 << max(0, (n - 1).bit_length())
    if block > max_block:
        raise ValueError(f"row of {n} elements exceeds the kernel's maximum block {max_block}")
    warps = 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32
    return block, warps
