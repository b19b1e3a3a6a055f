"""LoRAMLPFunction (gate/up -> SwiGLU -> down, LoRA on each) against the composition of reference ops.

Tolerances as in test_lora_linear.py: fp32 within 1e-5 of the largest reference element (observed <= 3e-7);
fp64 gradcheck; bf16 (fp32 adapters on a bf16 base, bf16 autocast) no further from the exact fp64 function than
2x the composition's error + 2^-9 (tests/lora_cases.py). The SwiGLU Triton kernel (interpreted on the CPU) is
exercised once through the public ``swiglu``, which the fused backward calls to recompute the activation.
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
from pronghorn.kernels.lora_mlp import LoRAMLPFunction, lora_mlp_reference

lora_mlp_module = importlib.import_module("pronghorn.kernels.lora_mlp")  # the package attribute is the function
swiglu_module = importlib.import_module("pronghorn.kernels.swiglu")
FP32_TOL = 1e-5


def fused(x, gate, up, down):
    return apply_fused(LoRAMLPFunction, x, (gate, up, down))


def mlp(hidden, inter, gen, base=torch.float32, adapter=torch.float32, bias=False):
    """Gate/up/down with different ranks and scalings (as a PEFT rank_pattern could give)."""
    projs = [projection(hidden, inter, 4, gen, scaling=2.0, bias=bias), projection(hidden, inter, 3, gen, scaling=0.6,
             bias=bias), projection(inter, hidden, 5, gen, scaling=1.0, bias=bias)]
    return as_dtype(projs, base, adapter)


@pytest.mark.parametrize("lead,hidden,inter,bias",
                         [((1,), 40, 70, False), ((2, 3), 40, 70, True), ((6,), 32, 64, False)],
                         ids=["one-row", "3d-bias", "pow2"])
def test_fp32_matches_composition(lead, hidden, inter, bias):
    gen = torch.Generator().manual_seed(0)
    projs = mlp(hidden, inter, gen, bias=bias)
    x = randn(*lead, hidden, generator=gen)
    assert_all_close(run(fused, x, projs), run(lora_mlp_reference, x, projs), FP32_TOL)


def test_gradcheck_fp64():
    gen = torch.Generator().manual_seed(1)
    projs = mlp(6, 10, gen, torch.float64, torch.float64, bias=True)
    x = randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert gradcheck_adapters(fused, x, projs)


def test_frozen_input():
    gen = torch.Generator().manual_seed(2)
    projs = mlp(40, 70, gen)
    x = randn(5, 40, generator=gen)
    got = run(fused, x, projs, x_grad=False)
    assert got[1] is None
    assert_all_close(got, run(lora_mlp_reference, x, projs, x_grad=False), FP32_TOL)


def test_fp32_adapters_on_bf16_base():
    gen = torch.Generator().manual_seed(3)
    projs = mlp(48, 96, gen, torch.bfloat16, torch.float32)
    x = randn(3, 5, 48, generator=gen).to(torch.bfloat16)
    got, ref = run(fused, x, projs), run(lora_mlp_reference, x, projs)
    assert_bf16_as_exact_as_reference(got, ref, exact_fp64(lora_mlp_reference, x, projs))


def test_autocast_bf16():
    gen = torch.Generator().manual_seed(4)
    projs = mlp(48, 96, gen, torch.bfloat16, torch.float32)
    x = randn(3, 5, 48, generator=gen).to(torch.bfloat16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, ref = run(fused, x, projs), run(lora_mlp_reference, x, projs)
    assert [t.dtype for t in got] == [t.dtype for t in ref]
    exact = exact_fp64(lora_mlp_reference, x, projs, adapter_rounding=torch.bfloat16)
    assert_bf16_as_exact_as_reference(got, ref, exact)


def test_with_the_swiglu_triton_kernel(monkeypatch):
    pytest.importorskip("pronghorn.kernels.swiglu_triton")
    gen = torch.Generator().manual_seed(5)
    projs = mlp(24, 40, gen)
    x = randn(3, 24, generator=gen)
    ref = run(lora_mlp_reference, x, projs)
    calls = []
    monkeypatch.setattr(swiglu_module, "use_triton", lambda *t: calls.append(1) or True)
    got = run(fused, x, projs)
    assert len(calls) == 2  # the forward, and the backward's recomputation
    assert_all_close(got, ref, FP32_TOL)


def _own_saved_bytes(fn, x, projs):
    inputs = {t.untyped_storage().data_ptr() for p in projs for t in p if isinstance(t, torch.Tensor)}
    inputs.add(x.untyped_storage().data_ptr())
    own = [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            own[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x.requires_grad_(), *projs)
    return own[0]


def test_saves_no_swiglu_output(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    n, hidden, inter = 30, 32, 64
    projs = mlp(hidden, inter, gen)  # ranks 4, 3, 5
    x = randn(n, hidden, generator=gen)
    expected = (2 * n * inter  # gate and up outputs
                + n * (4 + 3) + (4 + 3) * hidden  # x [A_g; A_u]^T and the stacked A's
                + inter * 4 + inter * 3  # s B_gate, s B_up (the down adapter's s = 1: B itself)
                + n * 5) * 4  # h A_down^T
    # what the Function itself saves (the SwiGLU kernel's own choice aside: its reference here)
    monkeypatch.setattr(importlib.import_module("pronghorn.kernels.swiglu"), "use_triton", lambda *t: False)
    assert _own_saved_bytes(fused, x, projs) == expected
    assert _own_saved_bytes(lora_mlp_reference, x, projs) >= expected + n * inter * 4


def test_nf4_bases():
    gen = torch.Generator().manual_seed(7)
    projs = mlp(64, 128, gen, bias=True)
    quantized, dense = nf4_and_dequantized(projs)
    x = randn(2, 3, 64, generator=gen)
    assert_all_close(run(fused, x, quantized), run(lora_mlp_reference, x, dense), FP32_TOL)


def test_dispatch(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    projs = mlp(16, 24, gen)
    x = randn(2, 16, generator=gen, requires_grad=True)
    if DEVICE == "cpu":  # CPU tensors: the reference
        assert "LoRAMLPFunction" not in type(lora_mlp_module.lora_mlp(x, *projs).grad_fn).__name__
    monkeypatch.setattr(lora_mlp_module, "use_triton", lambda *tensors: True)
    assert "LoRAMLPFunction" in type(lora_mlp_module.lora_mlp(x, *projs).grad_fn).__name__
