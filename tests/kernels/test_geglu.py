"""GeGLU (exact erf and tanh GELU): the Triton kernel against the PyTorch reference.

Without a GPU the kernel runs on CPU tensors through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are small. Triton 3.6's interpreter rounds fp32 -> bf16 toward zero where a
GPU rounds to nearest even; the ``_gpu_bf16_rounding`` fixture (tests/kernels/conftest.py) makes it round like a GPU.

Gates are N(0, 3^2), so the negative tail, where GELU computed in fp32 cancels, is exercised: torch
evaluates 0.5 x (1 + erf(x / sqrt 2)) and 0.5 x (1 + tanh(z)); once erf or tanh is within a few ulps of -1,
``1 + ...`` keeps only an absolute accuracy of ~2^-24, i.e. |x| 2^-24 on the output (the reference's tanh
form even returns exactly 0 below x ~ -5.5). The kernel's erf form cancels the same way (with another erf
rounding); its tanh form is x * sigmoid(2z), which does not cancel. Hence a tail term in the forward bound.

Tolerances, and why:
- Forward, fp32: |kernel - reference| <= 1e-5 |reference| + 2^-22 |gate * up|.
- Forward, bf16: |kernel - reference| <= 2 ulp(reference) + 2^-22 |gate * up|: the kernel rounds gelu(gate)
  to bf16 before multiplying by up, as F.gelu does; a gelu value at a rounding tie (or in the tail) may
  round the other way, 1 ulp, which the product by up can turn into 2.
- Gradients, fp32: max |kernel - reference| <= 1e-5 max |reference|.
- Gradients, bf16: the kernel works in fp32 and rounds once, so it is within 2^-7 max |g| (one bf16 ulp at
  the largest element) of the exact gradient g (fp64, same inputs); observed <= 2^-8. The bf16 reference
  rounds dy * up to bf16 before GELU's backward and is itself up to ~2^-8 from exact, so kernel vs
  reference is held to 2^-6 max |reference| (observed <= 2^-7).
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch
import torch.nn.functional as F

from kernel_cases import DEVICE, assert_grad, exact_gated_grads, gated_inputs, run_gated
from pronghorn.kernels import geglu
from pronghorn.kernels.geglu import geglu_reference

geglu_triton = pytest.importorskip("pronghorn.kernels.geglu_triton")
GeGLUFunction = geglu_triton.GeGLUFunction
geglu_module = importlib.import_module("pronghorn.kernels.geglu")  # the package attribute is the function

SHAPES = [(1, 64), (3, 7, 80), (5, 576), (2, 3, 1000)]
TAIL = 2.0**-22
# the tanh form's exp(-2z) overflows to inf for very negative gates, on purpose (sigmoid -> 0)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of ``x``'s dtype at each element's magnitude (0 where x is 0), in fp64."""
    mantissa_bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[x.dtype]
    _, exponent = torch.frexp(x.double())
    return torch.where(x == 0, 0.0, torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - mantissa_bits))


def _assert_forward(y, ref, gate, up, approximate="tanh"):
    """bf16/fp16: within 2 ulp of the reference. fp32: within 1e-5 of the exact (fp64) value, or as close to it as
    the reference is (torch's vectorized CPU erf is off by up to ~1e-3 relative in the tail on some processors,
    e.g. AVX-512 ones: gelu(-3.468) * 2.368 = -0.00215083 exactly, torch -0.00214920, the kernel -0.00215092)."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    y, ref, gate, up = (t.detach().cpu() for t in (y, ref, gate, up))
    tail = TAIL * (gate.double() * up.double()).abs()
    if ref.dtype == torch.float32:
        exact = F.gelu(gate.double(), approximate=approximate) * up.double()
        allowed = torch.maximum(1e-5 * exact.abs(), (ref.double() - exact).abs()) + tail
        excess = (y.double() - exact).abs() - allowed
    else:
        excess = (y.double() - ref.double()).abs() - (2 * _ulp(ref) + tail)
    assert excess.max().item() <= 0, f"forward off by {excess.max().item():.3g} beyond the stated bound"


def _assert_matches_reference(gate, up, dy, approximate):
    """The kernel's output and both gradients against the reference and the exact (fp64) gradients."""
    y, dg, du = run_gated(GeGLUFunction.apply, gate, up, dy, approximate)
    y_ref, dg_ref, du_ref = run_gated(geglu_reference, gate, up, dy, approximate)
    dg_exact, du_exact = exact_gated_grads(functools.partial(F.gelu, approximate=approximate), gate, up, dy)
    _assert_forward(y, y_ref, gate, up, approximate)
    assert_grad(dg, dg_ref, dg_exact)
    assert_grad(du, du_ref, du_exact)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(shape, dtype, approximate):
    _assert_matches_reference(*gated_inputs(shape, dtype), approximate)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fused_projection_slices_and_expanded_gradient(approximate):
    """gate/up as the two halves of one fused projection (row stride 2I) and a stride-0 upstream gradient."""
    g = torch.Generator().manual_seed(1)
    fused = torch.randn(5, 2 * 576, generator=g).to(torch.bfloat16).to(DEVICE)
    gate, up = fused[:, :576], fused[:, 576:]
    dy = torch.randn(576, generator=g).to(torch.bfloat16).to(DEVICE).expand(gate.shape)
    _assert_matches_reference(gate, up, dy, approximate)


def test_bad_arguments_are_refused():
    z = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="same shape"):
        GeGLUFunction.apply(z, z[:1], "none")
    with pytest.raises(ValueError, match="approximate"):
        geglu(z, z, approximate="sigmoid")


def test_public_function_on_cpu_is_the_reference():
    gate, up, _ = gated_inputs((3, 7, 80), torch.bfloat16)
    gate, up = gate.cpu().requires_grad_(), up.cpu()
    for approximate in ("none", "tanh"):
        y = geglu(gate, up, approximate=approximate)
        assert "GeGLUFunction" not in type(y.grad_fn).__name__
        assert torch.equal(y, geglu_reference(gate, up, approximate))


def test_public_function_dispatches_to_the_kernel(monkeypatch):
    monkeypatch.setattr(geglu_module, "use_triton", lambda *tensors: True)
    gate, up, _ = gated_inputs((3, 7, 80), torch.bfloat16)
    y = geglu(gate.requires_grad_(), up, approximate="tanh")
    assert "GeGLUFunction" in type(y.grad_fn).__name__
    _assert_forward(y, geglu_reference(gate, up, "tanh"), gate, up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_owned_inputs_take_the_gradients_in_place(dtype):
    """``owns_inputs`` (the MLP's fresh gate and up, as swiglu's): the backward writes d gate and d up over the
    saved gate and up, bitwise the ordinary backward's values."""
    gate, up, dy = gated_inputs((3, 7, 80), dtype)
    ordinary = run_gated(GeGLUFunction.apply, gate, up, dy, "tanh")
    owned = {}

    def owning(gate, up, approximate):
        owned["g"], owned["u"] = gate * 1, up * 1  # fresh tensors nothing else uses
        return GeGLUFunction.apply(owned["g"], owned["u"], approximate, True)

    got = run_gated(owning, gate, up, dy, "tanh")
    assert all(torch.equal(a, b) for a, b in zip(got, ordinary))
    assert torch.equal(owned["g"].detach(), got[1]) and torch.equal(owned["u"].detach(), got[2])
