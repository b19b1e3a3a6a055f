"""RMSNorm: the Triton kernel (forward and hand-written backward) against the PyTorch reference.

Without a GPU the kernel runs on CPU tensors through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are small. Triton 3.6's interpreter rounds fp32 -> bf16 toward zero where a
GPU rounds to nearest even; the ``_gpu_bf16_rounding`` fixture (tests/kernels/conftest.py) makes it round like a GPU, so the bf16
checks below mean what they would mean on one (without it the bit-level forward checks fail).

Tolerances, and why:
- Forward, fp32: |kernel - reference| <= 1e-5 |reference| + 1e-7. The only freedom is the order of the fp32
  sum of squares and the last bit of 1/sqrt (observed: <= 2e-7 relative).
- Forward, bf16/fp16: bit-identical to the reference on >= 99% of elements, and within 2 ulps everywhere.
  The kernel follows the reference's order (normalise in fp32, round to the input dtype, multiply by the
  weight, round), so only a normalised value within an fp32 hair of a rounding tie can round the other way
  (1 ulp, which the product by the weight can turn into 2). Observed: bit-identical.
- Gradients, fp32: max |kernel - reference| <= 1e-5 max |reference| (observed <= 3e-7).
- Gradients, bf16: the kernel keeps dY * w and every sum in fp32 and rounds once, so it is within
  2^-7 max |g| (one bf16 ulp at the largest element) of the exact gradient g (fp64, same bf16 inputs,
  the forward's rounding step taken as identity as autograd does); observed <= 2^-8. The bf16 reference
  rounds dY * w to bf16 first and is itself up to ~1.5 * 2^-8 from exact, so kernel vs reference is held to
  2^-6 max |reference| (observed <= 2^-7).
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import DEVICE, assert_close_ulps, assert_grad, rel_to_max
from pronghorn.kernels import rms_norm
from pronghorn.kernels import rmsnorm as rmsnorm_module
from pronghorn.kernels.rmsnorm import rms_norm_reference

rmsnorm_triton = pytest.importorskip("pronghorn.kernels.rmsnorm_triton")
RMSNormFunction = rmsnorm_triton.RMSNormFunction

EPS = 1e-6
SHAPES = [(1, 64), (3, 7, 80), (5, 576), (2, 3, 1000)]
# (weight trainable, offset): plain Llama norm, frozen Gemma norm, and the two other pairings
WEIGHT_CASES = [(True, 0.0), (False, 1.0), (True, 1.0), (False, 0.0)]


def _inputs(shape, dtype, trainable, offset, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (torch.randn(shape[-1], generator=g) * 0.1 + (0.0 if offset else 1.0)).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    return x.to(DEVICE), w.to(DEVICE).requires_grad_(trainable), dy.to(DEVICE)


def _run(fn, x, w, dy, offset):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_(w.requires_grad)
    y = fn(x, w, EPS, offset)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _exact_grads(x, w, dy, offset):
    """fp64 gradients of the reference's function on the same inputs (its rounding step is the identity)."""
    x64 = x.detach().cpu().double().requires_grad_()
    w64 = w.detach().cpu().double().requires_grad_()
    normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    if not offset:  # Llama's form rounds the normalised row before scaling it; Gemma's scales it in fp32
        normed = normed + (normed.to(x.dtype).double() - normed).detach()  # forward rounds, gradient passes
    w_eff = w64 + offset
    (w_eff * normed).backward(dy.cpu().double())
    return x64.grad, w64.grad


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("trainable,offset", WEIGHT_CASES)
def test_matches_reference(shape, dtype, trainable, offset):
    x, w, dy = _inputs(shape, dtype, trainable, offset)
    y, dx, dw = _run(RMSNormFunction.apply, x, w, dy, offset)
    y_ref, dx_ref, dw_ref = _run(rms_norm_reference, x, w, dy, offset)
    dx_exact, dw_exact = _exact_grads(x, w, dy, offset)

    assert_close_ulps(y, y_ref)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert_grad(dx, dx_ref, dx_exact)
    if trainable:
        assert dw.dtype == w.dtype and dw.shape == w.shape
        assert_grad(dw, dw_ref, dw_exact)
    else:
        assert dw is None


def test_frozen_weight_gets_no_gradient_from_the_backward():
    x, w, dy = _inputs((3, 80), torch.float32, False, 0.0)
    y, x2, rstd = rmsnorm_triton.rms_norm_forward(x, w, EPS)
    dx, dw = rmsnorm_triton.rms_norm_backward(dy, x2, w, rstd, 0.0, need_dw=False)
    assert dw is None and dx.shape == (3, 80)


@pytest.mark.parametrize("shape", [(5, 576), (70, 80)], ids=str)
def test_one_program_loops_over_many_tiles(monkeypatch, shape):
    """Few backward programs: each reduces dW over several row tiles, the last ones past the end."""
    monkeypatch.setattr(rmsnorm_triton, "_dw_programs", lambda device: 1)
    x, w, dy = _inputs(shape, torch.float32, True, 0.0, seed=1)
    y, dx, dw = _run(RMSNormFunction.apply, x, w, dy, 0.0)
    y_ref, dx_ref, dw_ref = _run(rms_norm_reference, x, w, dy, 0.0)
    assert_close_ulps(y, y_ref)
    assert rel_to_max(dx, dx_ref) <= 1e-5 and rel_to_max(dw, dw_ref) <= 1e-5


def test_strided_inputs_and_gradients():
    """Transposed and sliced inputs (row stride != hidden) and an expanded (stride 0) upstream gradient."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(7, 3, 200, generator=g).to(DEVICE)
    w = (torch.randn(80, generator=g) + 1).to(DEVICE).requires_grad_()
    for x in (base[..., :80].transpose(0, 1), base[:, 1, 40:120]):
        dy = torch.randn(80, generator=g).to(DEVICE).expand(x.shape)
        y, dx, dw = _run(RMSNormFunction.apply, x, w, dy, 0.0)
        y_ref, dx_ref, dw_ref = _run(rms_norm_reference, x, w, dy, 0.0)
        assert_close_ulps(y, y_ref)
        assert rel_to_max(dx, dx_ref) <= 1e-5 and rel_to_max(dw, dw_ref) <= 1e-5


def test_fp32_weight_with_bf16_input_and_fp16():
    x, _, dy = _inputs((3, 7, 80), torch.bfloat16, True, 0.0, seed=3)
    w = torch.linspace(0.5, 1.5, 80, device=DEVICE).requires_grad_()  # fp32 weight: fp32 output, as torch promotes
    y, dx, dw = _run(RMSNormFunction.apply, x, w, dy.float(), 0.0)
    y_ref, dx_ref, dw_ref = _run(rms_norm_reference, x, w, dy.float(), 0.0)
    assert y.dtype == torch.float32 and dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert torch.equal(y, y_ref)  # same rounded normalised value times the same fp32 weight
    assert rel_to_max(dx, dx_ref) <= 2**-6 and rel_to_max(dw, dw_ref) <= 1e-5

    x, w, dy = _inputs((5, 576), torch.float16, True, 1.0, seed=4)
    y, dx, dw = _run(RMSNormFunction.apply, x, w, dy, 1.0)
    y_ref, dx_ref, dw_ref = _run(rms_norm_reference, x, w, dy, 1.0)
    assert_close_ulps(y, y_ref)
    assert rel_to_max(dx, dx_ref) <= 2**-9 and rel_to_max(dw, dw_ref) <= 2**-9  # fp16: 3 more mantissa bits


def test_empty_input():
    x = torch.empty(0, 3, 64, device=DEVICE, requires_grad=True)
    w = torch.ones(64, device=DEVICE, requires_grad=True)
    y = RMSNormFunction.apply(x, w, EPS, 0.0)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_public_function_on_cpu_is_the_reference():
    x, w, dy = _inputs((3, 7, 80), torch.bfloat16, True, 1.0)
    x, w = x.cpu().requires_grad_(), w.detach().cpu().requires_grad_()
    y = rms_norm(x, w, EPS, offset=1.0)
    assert "RMSNormFunction" not in type(y.grad_fn).__name__
    assert torch.equal(y, rms_norm_reference(x, w, EPS, 1.0))


def test_public_function_dispatches_to_the_kernel(monkeypatch):
    monkeypatch.setattr(rmsnorm_module, "use_triton", lambda *tensors: True)
    x, w, dy = _inputs((3, 7, 80), torch.bfloat16, True, 1.0)
    y = rms_norm(x.requires_grad_(), w, EPS, offset=1.0)
    assert "RMSNormFunction" in type(y.grad_fn).__name__
    assert_close_ulps(y.detach(), rms_norm_reference(x, w, EPS, 1.0).detach())
