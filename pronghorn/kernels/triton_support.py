"""When the Triton fast path may run, and launch-size helpers shared by the kernels.

Dispatch is by device: a CUDA tensor with Triton importable takes the kernel; anything else takes the
PyTorch reference (so does everything under a reference kernel policy, ``kernels.policy``). Kernel modules (``*_triton.py``) are imported only on that path, so ``import pronghorn``
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


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor is a CUDA tensor, every floating one of a dtype the kernels take (fp16/bf16/
    fp32; integer labels and positions pass) and Triton is importable."""
    return all(t.is_cuda and kernel_dtype_ok(t) for t in tensors) and triton_available()


def kernel_dtype_ok(t: torch.Tensor) -> bool:
    """Floating tensors must be fp16/bf16/fp32 (fp64 takes the reference); integer ones (labels, positions)
    always pass."""
    return t.dtype in _KERNEL_DTYPES or not t.is_floating_point()


def row_block(n: int, max_block: int = 65536) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that keeps one row of ``n`` elements in registers."""
    block = 1 << max(0, (n - 1).bit_length())
    if block > max_block:
        raise ValueError(f"row of {n} elements exceeds the kernel's maximum block {max_block}")
    warps = 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32
    return block, warps


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A [rows, last dim] view of ``t`` (a copy only when the last dimension is not unit-stride)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def elementwise_launch(n_rows: int, n_cols: int, max_block: int = 2048) -> tuple[tuple[int, int], int, int]:
    """(grid, BLOCK, num_warps) for an elementwise kernel: one row per grid row, column blocks of at most
    ``max_block`` elements."""
    block = min(1 << max(0, (n_cols - 1).bit_length()), max_block)
    return (n_rows, -(-n_cols // block)), block, 4 if block <= 1024 else 8
