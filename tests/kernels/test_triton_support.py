"""Dispatch rules: which tensors may take a Triton kernel (the device check itself needs a GPU: tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from pronghorn.kernels.policy import KernelPolicy
from pronghorn.kernels.triton_support import kernel_dtype_ok


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.int32, torch.bool])
def test_kernel_dtypes_and_integer_labels_pass(dtype):
    # integer labels must pass: the fused head once fell back to the reference because its int64 labels failed
    assert kernel_dtype_ok(torch.zeros(2, dtype=dtype))


def test_fp64_takes_the_reference():
    assert not kernel_dtype_ok(torch.zeros(2, dtype=torch.float64))


def test_a_reference_policy_takes_every_reference(monkeypatch):
    """Every op's dispatch asks the policy first: with ``reference=True`` no kernel runs even where one would."""
    import importlib

    from helpers import tiny_lora_model

    taken = []
    for name in ("rmsnorm", "rope", "swiglu", "linear_cross_entropy", "lora_linear", "lora_qkv"):
        mod = importlib.import_module(f"pronghorn.kernels.{name}")
        monkeypatch.setattr(mod, "use_triton", lambda *t, _n=name: taken.append(_n) or False)
    model = tiny_lora_model().train()
    model.set_kernel_policy(KernelPolicy(reference=True))
    ids = torch.randint(0, 97, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert taken == []
    assert all(m.kernel_policy.reference for m in model.modules() if hasattr(type(m), "kernel_policy"))
    model.set_kernel_policy(KernelPolicy())
    model(input_ids=ids, labels=ids).loss.backward()
    assert {"rmsnorm", "rope", "swiglu", "linear_cross_entropy"} <= set(taken)
