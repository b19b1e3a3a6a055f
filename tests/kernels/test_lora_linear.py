"""LoRALinearFunction (hand-written backward, frozen base) against the PEFT-semantics reference, on the GPU where
one exists (the Functions are plain torch; the CPU runs them too).

Tolerances, and why:
- fp64: torch.autograd.gradcheck (finite differences) on tiny shapes.
- fp32: every output and gradient within 1e-5 of the reference's largest element (observed <= 3e-7): the
  same products, only summed in a different order (the delta is added inside the base matmul's
  accumulation, ``s`` is folded into B, the adapter's dX is accumulated into the base's).
- fp32 adapter on a bf16 base, and bf16 autocast: against the exact function (fp64 on the same rounded
  inputs) the fused op is no further than ``2 x`` the reference's error + 2^-9 (tests/lora_cases.py says why).
- Dropout: the same random stream as the reference's ``F.dropout``, so fp32 results match like the rest.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from lora_cases import (
    DEVICE, as_dtype, assert_all_close, assert_bf16_as_exact_as_reference, exact_fp64, projection, randn, run,
)
from pronghorn.kernels.lora_linear import LoRALinearFunction, LoRAProjection, lora_linear_reference
from pronghorn.kernels.lora_math import autocast_dtype

lora_linear_module = importlib.import_module("pronghorn.kernels.lora_linear")  # the package attribute is the function

FP32_TOL = 1e-5


def fused(x, p, dropout=0.0):
    return LoRALinearFunction.apply(x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling, dropout,
                                    autocast_dtype(x.device.type))


def reference(x, p, dropout=0.0):
    return lora_linear_reference(x, *p, dropout=dropout, training=True)


@pytest.mark.parametrize("lead,n_in,n_out,bias", [((1,), 37, 29, False), ((3, 5), 37, 29, True), ((7,), 64, 96, False)],
                         ids=["one-row", "3d-bias", "pow2"])
def test_fp32_matches_reference(lead, n_in, n_out, bias):
    gen = torch.Generator().manual_seed(0)
    p = projection(n_in, n_out, 4, gen, scaling=0.7, bias=bias)
    x = randn(*lead, n_in, generator=gen)
    assert_all_close(run(fused, x, [p]), run(reference, x, [p]), FP32_TOL)


def test_gradcheck_fp64():
    gen = torch.Generator().manual_seed(1)
    p = projection(5, 4, 2, gen, base=torch.float64, adapter=torch.float64, scaling=1.5, bias=True)
    x = randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    f = lambda x, a, b: LoRALinearFunction.apply(x, p.weight, p.bias, a, b, p.scaling, 0.0, None)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, p.lora_A, p.lora_B))


def test_frozen_input_and_frozen_adapter():
    gen = torch.Generator().manual_seed(2)
    p = projection(24, 40, 4, gen, scaling=2.0)
    x = randn(3, 24, generator=gen)
    got, ref = run(fused, x, [p], x_grad=False), run(reference, x, [p], x_grad=False)
    assert got[1] is None
    assert_all_close(got, ref, FP32_TOL)
    frozen = p._replace(lora_A=p.lora_A.detach(), lora_B=p.lora_B.detach())
    xg = x.clone().requires_grad_()
    fused(xg, frozen).backward(torch.ones(3, 40, device=DEVICE))
    xr = x.clone().requires_grad_()
    reference(xr, frozen).backward(torch.ones(3, 40, device=DEVICE))
    assert_all_close([xg.grad], [xr.grad], FP32_TOL)


@pytest.mark.parametrize("base", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_uses_the_reference_random_stream(base):
    gen = torch.Generator().manual_seed(3)
    p = as_dtype([projection(33, 20, 4, gen, scaling=0.5, bias=True)], base, torch.float32)[0]
    x = randn(2, 6, 33, generator=gen).to(base)
    torch.manual_seed(11)
    got = run(lambda x, p: fused(x, p, 0.3), x, [p])
    torch.manual_seed(11)
    ref = run(lambda x, p: reference(x, p, 0.3), x, [p])
    assert_all_close(got, ref, FP32_TOL if base == torch.float32 else 2**-8)
    assert not torch.equal(got[0], run(fused, x, [p])[0]), "dropout dropped nothing"


def test_fp32_adapter_on_bf16_base():
    gen = torch.Generator().manual_seed(4)
    p = as_dtype([projection(48, 80, 8, gen, scaling=0.25, bias=True)], torch.bfloat16, torch.float32)[0]
    x = randn(3, 7, 48, generator=gen).to(torch.bfloat16)
    got, ref = run(fused, x, [p]), run(reference, x, [p])
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    assert_bf16_as_exact_as_reference(got, ref, exact_fp64(reference, x, [p]))


def test_autocast_bf16():
    gen = torch.Generator().manual_seed(5)
    p = as_dtype([projection(48, 80, 8, gen, scaling=2.0)], torch.bfloat16, torch.float32)[0]
    x = randn(3, 7, 48, generator=gen).to(torch.bfloat16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, ref = run(fused, x, [p]), run(reference, x, [p])
    assert [t.dtype for t in got] == [t.dtype for t in ref] == [torch.bfloat16] * 2 + [torch.float32] * 2
    assert_bf16_as_exact_as_reference(got, ref, exact_fp64(reference, x, [p], adapter_rounding=torch.bfloat16))


def _saved_bytes(fn, *args):
    """(bytes saved for backward that are not an input's storage, storages saved) during ``fn(*args)``."""
    inputs = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}
    own, ptrs = [0], []

    def pack(t):
        ptrs.append(t.untyped_storage().data_ptr())
        if ptrs[-1] not in inputs:
            own[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return own[0], ptrs


def test_saves_only_rank_r_products_and_input_references():
    gen = torch.Generator().manual_seed(6)
    p = projection(64, 96, 4, gen, scaling=2.0)
    x = randn(50, 64, generator=gen, requires_grad=True)
    own, ptrs = _saved_bytes(lambda *a: fused(a[0], LoRAProjection(*a[1:])), x, *p)
    # x A^T [50, 4] and s B [96, 4], fp32; x, W and A are saved by reference
    assert own == (50 * 4 + 96 * 4) * 4
    assert x.untyped_storage().data_ptr() in ptrs and p.weight.untyped_storage().data_ptr() in ptrs


def test_nf4_base_is_dequantized_not_saved():
    nf4 = pytest.importorskip("pronghorn.kernels.nf4")
    gen = torch.Generator().manual_seed(7)
    p = projection(128, 64, 4, gen, scaling=2.0, bias=True)
    q = nf4.quantize_nf4(p.weight, dtype=torch.float32)
    x = randn(2, 5, 128, generator=gen)
    pq, pd = p._replace(weight=q), p._replace(weight=q.dequantize())
    assert_all_close(run(fused, x, [pq]), run(reference, x, [pd]), FP32_TOL)
    own, _ = _saved_bytes(lambda x, *rest: fused(x, pq), x.requires_grad_(), p.bias, p.lora_A, p.lora_B)
    assert own == (10 * 4 + 64 * 4) * 4  # no dequantized [64, 128] weight among the saved tensors


def test_dispatch(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    p = projection(16, 8, 2, gen)
    x = randn(3, 16, generator=gen, requires_grad=True)
    if DEVICE == "cpu":  # CPU tensors: the reference
        assert "LoRALinearFunction" not in type(lora_linear_module.lora_linear(x, *p).grad_fn).__name__
    monkeypatch.setattr(lora_linear_module, "use_triton", lambda *tensors: True)  # as on a CUDA device
    assert "LoRALinearFunction" in type(lora_linear_module.lora_linear(x, *p).grad_fn).__name__
    trained = p._replace(weight=p.weight.clone().requires_grad_())
    assert "LoRALinearFunction" not in type(lora_linear_module.lora_linear(x, *trained).grad_fn).__name__
    out = lora_linear_module.lora_linear(x, p.weight, None, None, None, 0.0)  # no adapter: the base alone
    assert torch.equal(out, x @ p.weight.t())


@pytest.mark.parametrize("base,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16", "autocast"])
def test_unused_output_keeps_the_gradients_bitwise(base, autocast):
    """A replay whose output is thrown away (output_unused) skips the base matmul and the delta, but saves the
    same tensors: every gradient is bitwise the full forward's, and the output keeps its shape and dtype."""
    nf4 = pytest.importorskip("pronghorn.kernels.nf4")
    gen = torch.Generator().manual_seed(9)
    p = as_dtype([projection(64, 48, 4, gen, scaling=0.5, bias=True)], base, torch.float32)[0]
    x = randn(3, 5, 64, generator=gen).to(base)
    for weight in (p.weight, nf4.quantize_nf4(p.weight, dtype=base)):
        q = p._replace(weight=weight)
        unused = lambda x, p: LoRALinearFunction.apply(x, p.weight, p.bias, p.lora_A, p.lora_B,  # noqa: E731
                                                       p.scaling, 0.0, autocast_dtype(x.device.type), True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            got, full = run(unused, x, [q]), run(fused, x, [q])
        assert got[0].shape == full[0].shape and got[0].dtype == full[0].dtype
        for g, f in zip(got[1:], full[1:]):
            assert torch.equal(g, f)


@pytest.mark.parametrize("base,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16", "autocast"])
def test_owned_input_takes_its_gradient_in_place(base, autocast):
    """``owns_input`` (the MLP's down projection, whose input is its own SwiGLU product): every gradient is
    bitwise the ordinary backward's, and the spent input buffer now holds d x (one [tokens, in] buffer less at
    the backward's peak)."""
    gen = torch.Generator().manual_seed(4)
    p = as_dtype([projection(64, 48, 4, gen, scaling=0.5, bias=True)], base, torch.float32)[0]
    x = randn(3, 5, 64, generator=gen).to(base)
    owned = {}

    def owning(x, p):
        owned["x"] = x * 1  # a fresh tensor nothing else uses
        return LoRALinearFunction.apply(owned["x"], p.weight, p.bias, p.lora_A, p.lora_B, p.scaling, 0.0,
                                        autocast_dtype(x.device.type), False, True)

    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        got, ordinary = run(owning, x, [p]), run(fused, x, [p])
    for g, f in zip(got, ordinary):
        assert torch.equal(g, f)
    assert torch.equal(owned["x"].detach(), got[1])
