"""Dispatch rules: which tensors may take a Triton kernel (the device check itself needs a GPU: tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from pronghorn.kernels.triton_support import kernel_dtype_ok, reference_kernels, reference_only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.int32, torch.bool])
def test_kernel_dtypes_and_integer_labels_pass(dtype):
    # integer labels must pass: the fused head once fell back to the reference because its int64 labels failed
    assert kernel_dtype_ok(torch.zeros(2, dtype=dtype))


def test_fp64_takes_the_reference():
    assert not kernel_dtype_ok(torch.zeros(2, dtype=torch.float64))


def test_reference_kernels_block_is_scoped():
    assert not reference_only()
    with reference_kernels():
        assert reference_only()
    assert not reference_only()
