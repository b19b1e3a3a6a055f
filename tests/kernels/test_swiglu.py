"""SwiGLU: the Triton kernel (forward and recomputing backward) against the PyTorch reference.

Without a GPU the kernel runs on CPU tensors through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are small. Triton 3.6's interpreter rounds fp32 -> bf16 toward zero where a
GPU rounds to nearest even; the ``_gpu_bf16_rounding`` fixture (tests/kernels/conftest.py) makes it round like a GPU.

Tolerances, and why:
- Forward, fp32: |kernel - reference| <= 1e-5 |reference| + 1e-7: same formula, x / (1 + exp(-x)), only
  the last bit of exp differs (observed <= 3e-7 relative).
- Forward, bf16: bit-identical to the reference on >= 99% of elements and within 2 ulps everywhere: like
  F.silu, the kernel rounds silu(gate) to bf16 before multiplying by up, so only a silu value within the
  last bit of exp of a rounding tie can round the other way (1 ulp, which the product by up can turn into
  2). Observed: bit-identical.
- d(up) = dy * round(silu(gate)) is one product rounded once, as in the reference: the same bound.
- Other gradients, fp32: max |kernel - reference| <= 1e-5 max |reference|.
- Other gradients, bf16: the kernel computes dy * up * silu'(gate) in fp32 and rounds once, so it is within
  2^-7 max |g| (one bf16 ulp at the largest element) of the exact gradient g (fp64 on the same inputs);
  observed <= 2^-8. The bf16 reference rounds dy * up to bf16 before silu's backward and is itself up to
  ~2^-8 from exact, so kernel vs reference is held to 2^-6 max |reference| (observed <= 2^-7).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from pronghorn.kernels import swiglu
from pronghorn.kernels.swiglu import swiglu_reference

swiglu_triton = pytest.importorskip("pronghorn.kernels.swiglu_triton")
SwiGLUFunction = swiglu_triton.SwiGLUFunction
swiglu_module = importlib.import_module("pronghorn.kernels.swiglu")  # the package attribute is the function

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 64), (3, 7, 80), (5, 576), (2, 3, 1000)]


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """16-bit float patterns mapped to integers that are consecutive for consecutive values."""
    i = x.view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up, dy = (torch.randn(shape, generator=g) * s for s in (3, 1, 1))
    return gate.to(dtype).to(DEVICE), up.to(dtype).to(DEVICE), dy.to(dtype).to(DEVICE)


def _run(fn, gate, up, dy):
    gate, up = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    y = fn(gate, up)
    y.backward(dy)
    return y.detach(), gate.grad, up.grad


def _exact_grads(gate, up, dy):
    """fp64 gradients of the reference's function (its rounding of silu(gate) taken as the identity)."""
    g64, u64 = (t.detach().cpu().double().requires_grad_() for t in (gate, up))
    act = F.silu(g64)
    act = act + (act.to(gate.dtype).double() - act).detach()
    (act * u64).backward(dy.cpu().double())
    return g64.grad, u64.grad


def _rel_to_max(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _assert_close_ulps(out, ref, min_identical=0.99):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)
    else:
        ulps = (_ordered_bits(out) - _ordered_bits(ref)).abs()
        assert ulps.max().item() <= 2, f"{ulps.max().item()} ulps from the reference"
        assert (ulps == 0).float().mean().item() >= min_identical


def _assert_grad(got, ref, exact):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if got.dtype == torch.float32:
        assert _rel_to_max(got, ref) <= 1e-5
    else:
        assert _rel_to_max(got, exact) <= 2**-7, "more than 1 bf16 ulp (of the largest element) from exact"
        assert _rel_to_max(got, ref) <= 2**-6


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(shape, dtype):
    gate, up, dy = _inputs(shape, dtype)
    y, dg, du = _run(SwiGLUFunction.apply, gate, up, dy)
    y_ref, dg_ref, du_ref = _run(swiglu_reference, gate, up, dy)
    dg_exact, du_exact = _exact_grads(gate, up, dy)

    _assert_close_ulps(y, y_ref)
    _assert_close_ulps(du, du_ref)
    _assert_grad(dg, dg_ref, dg_exact)
    _assert_grad(du, du_ref, du_exact)


def test_fused_projection_slices_and_expanded_gradient():
    """gate/up as the two halves of one fused projection (row stride 2I) and a stride-0 upstream gradient."""
    g = torch.Generator().manual_seed(1)
    fused = (torch.randn(2, 3, 2 * 1000, generator=g)).to(torch.bfloat16).to(DEVICE)
    gate, up = fused[..., :1000], fused[..., 1000:]
    dy = torch.randn(1000, generator=g).to(torch.bfloat16).to(DEVICE).expand(gate.shape)
    y, dg, du = _run(SwiGLUFunction.apply, gate, up, dy)
    y_ref, dg_ref, du_ref = _run(swiglu_reference, gate, up, dy)
    _assert_close_ulps(y, y_ref)
    _assert_close_ulps(du, du_ref)
    _assert_grad(dg, dg_ref, _exact_grads(gate, up, dy)[0])


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        SwiGLUFunction.apply(torch.zeros(2, 8, device=DEVICE), torch.zeros(1, 8, device=DEVICE))


def test_public_function_on_cpu_is_the_reference():
    gate, up, _ = _inputs((3, 7, 80), torch.bfloat16)
    gate, up = gate.cpu().requires_grad_(), up.cpu()
    y = swiglu(gate, up)
    assert "SwiGLUFunction" not in type(y.grad_fn).__name__
    assert torch.equal(y, swiglu_reference(gate, up))


def test_public_function_dispatches_to_the_kernel(monkeypatch):
    monkeypatch.setattr(swiglu_module, "use_triton", lambda *tensors: True)
    gate, up, _ = _inputs((3, 7, 80), torch.bfloat16)
    y = swiglu(gate.requires_grad_(), up)
    assert "SwiGLUFunction" in type(y.grad_fn).__name__
    _assert_close_ulps(y.detach(), swiglu_reference(gate, up).detach())
