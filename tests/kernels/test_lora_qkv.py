"""LoRAQKVFunction (q/k/v of one input, stacked adapters) against three reference LoRA linears.

Tolerances as in test_lora_linear.py: fp32 within 1e-5 of the largest reference element; fp64 gradcheck;
bf16 no further from the exact fp64 function than 2x the reference's error + 2^-9 (tests/lora_cases.py).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from lora_cases import (
    DEVICE, as_dtype, assert_all_close, assert_bf16_as_exact_as_reference, exact_fp64, gradcheck_adapters,
    nf4_and_dequantized, projection, randn, run,
)
from pronghorn.kernels.lora_math import apply_fused
from pronghorn.kernels.lora_qkv import LoRAQKVFunction, lora_qkv_reference

lora_qkv_module = importlib.import_module("pronghorn.kernels.lora_qkv")  # the package attribute is the function
FP32_TOL = 1e-5


def fused(x, q, k, v):
    return apply_fused(LoRAQKVFunction, x, (q, k, v))


def qkv(hidden, q_out, kv_out, gen, base=torch.float32, adapter=torch.float32, bias=False):
    projs = [projection(hidden, q_out, 4, gen, scaling=2.0, bias=bias), projection(hidden, kv_out, 4, gen, scaling=2.0,
             bias=bias), projection(hidden, kv_out, 2, gen, scaling=0.7, bias=bias)]
    return as_dtype(projs, base, adapter)


@pytest.mark.parametrize("lead,hidden,bias", [((1,), 40, False), ((2, 3), 40, True), ((9,), 64, False)],
                         ids=["one-row", "3d-bias", "pow2"])
def test_fp32_matches_reference(lead, hidden, bias):
    gen = torch.Generator().manual_seed(0)
    projs = qkv(hidden, 48, 16, gen, bias=bias)
    x = randn(*lead, hidden, generator=gen)
    assert_all_close(run(fused, x, projs), run(lora_qkv_reference, x, projs), FP32_TOL)


def test_gradcheck_fp64():
    gen = torch.Generator().manual_seed(1)
    projs = qkv(6, 8, 4, gen, torch.float64, torch.float64, bias=True)
    x = randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert gradcheck_adapters(fused, x, projs)


def test_frozen_input_and_unused_output():
    gen = torch.Generator().manual_seed(2)
    projs = qkv(40, 48, 16, gen)
    x = randn(5, 40, generator=gen)
    got = run(fused, x, projs, x_grad=False)
    assert got[3] is None
    assert_all_close(got, run(lora_qkv_reference, x, projs, x_grad=False), FP32_TOL)
    for p in projs:
        p.lora_A.grad = p.lora_B.grad = None
    q, k, v = fused(x.requires_grad_(), *projs)
    q.sum().backward()  # k and v unused: their adapters get zero gradients
    assert projs[1].lora_B.grad.abs().max() == 0 and projs[0].lora_B.grad.abs().max() > 0


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32-adapters", "autocast"])
def test_bf16(autocast):
    gen = torch.Generator().manual_seed(3)
    projs = qkv(48, 64, 32, gen, torch.bfloat16, torch.float32, bias=True)
    x = randn(3, 5, 48, generator=gen).to(torch.bfloat16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        got, ref = run(fused, x, projs), run(lora_qkv_reference, x, projs)
    assert [t.dtype for t in got] == [t.dtype for t in ref]
    exact = exact_fp64(lora_qkv_reference, x, projs, adapter_rounding=torch.bfloat16 if autocast else None)
    assert_bf16_as_exact_as_reference(got, ref, exact)


def test_nf4_bases():
    gen = torch.Generator().manual_seed(4)
    projs = qkv(64, 64, 32, gen)
    quantized, dense = nf4_and_dequantized(projs)
    x = randn(2, 3, 64, generator=gen)
    assert_all_close(run(fused, x, quantized), run(lora_qkv_reference, x, dense), FP32_TOL)


def test_dispatch(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    projs = qkv(16, 16, 8, gen)
    x = randn(2, 16, generator=gen, requires_grad=True)
    if DEVICE == "cpu":  # CPU tensors: the reference
        assert "LoRAQKVFunction" not in type(lora_qkv_module.lora_qkv(x, *projs)[0].grad_fn).__name__
    monkeypatch.setattr(lora_qkv_module, "use_triton", lambda *tensors: True)
    assert "LoRAQKVFunction" in type(lora_qkv_module.lora_qkv(x, *projs)[0].grad_fn).__name__
