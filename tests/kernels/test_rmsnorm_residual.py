"""The norm that takes its block's residual gradient (``ResidualRMSNormFunction``) against the unfused norm plus
autograd's sum of the two gradients: bit for bit in bf16 and fp16, since the kernel rounds the norm's dX to its
dtype before adding the residual's in fp32, as torch's add does. fp32 inputs keep the unfused path (on a GPU the
compiler fuses the kernel's last product and the add into an FMA: H100, session 27, the last bit differed).
On the CPU the kernel runs in Triton's interpreter (tests/conftest.py), whose bf16 rounding is made a GPU's
(tests/kernels/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from helpers import make_pair
from kernel_cases import DEVICE
from pronghorn.kernels import rms_norm_with_residual
from pronghorn.kernels import rmsnorm as rmsnorm_module

rmsnorm_triton = pytest.importorskip("pronghorn.kernels.rmsnorm_triton")
Fused, Unfused = rmsnorm_triton.ResidualRMSNormFunction, rmsnorm_triton.RMSNormFunction

EPS = 1e-6


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, scale, dout = (torch.randn(shape, generator=g) * 3).to(dtype), torch.randn(shape, generator=g).to(dtype), \
        torch.randn(shape, generator=g).to(dtype)
    w = (torch.randn(shape[-1], generator=g) * 0.1 + 1).to(dtype)
    return x.to(DEVICE), w.to(DEVICE), scale.to(DEVICE), dout.to(DEVICE)


def _block(fused, x, w, scale, dout, offset=0.0, x_grad=True, w_grad=True, use_norm=True, use_residual=True):
    """``x + normed * scale`` (a stand-in for the block's branch), backward from ``dout``: (out, dx, dw)."""
    x = x.detach().clone().requires_grad_(x_grad)
    w = w.detach().clone().requires_grad_(w_grad)
    if fused:
        normed, residual = Fused.apply(x, w, EPS, offset)
    else:
        normed, residual = Unfused.apply(x, w, EPS, offset), x
    out = (residual if use_residual else 0) + (normed * scale if use_norm else 0)
    out.backward(dout)
    return out.detach(), x.grad, w.grad


def _equal(a, b):
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@pytest.mark.parametrize("shape", [(1, 64), (3, 7, 80), (2, 3, 1000)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_the_summed_gradient_is_the_unfused_one_bit_for_bit(shape, dtype, offset):
    x, w, scale, dout = _inputs(shape, dtype)
    got, want = _block(True, x, w, scale, dout, offset), _block(False, x, w, scale, dout, offset)
    assert all(_equal(a, b) for a, b in zip(got, want))
    assert got[1].dtype == dtype and got[1].shape == x.shape


@pytest.mark.parametrize("case", [dict(use_residual=False), dict(use_norm=False), dict(x_grad=False),
                                  dict(w_grad=False)], ids=str)
def test_an_unused_output_or_a_frozen_input(case):
    """Only the norm or only the residual in the loss (the other's gradient is None), or no gradient wanted for
    the input or the weight: the same gradients as unfused."""
    x, w, scale, dout = _inputs((5, 576), torch.bfloat16, seed=1)
    got, want = _block(True, x, w, scale, dout, **case), _block(False, x, w, scale, dout, **case)
    assert all(_equal(a, b) for a, b in zip(got, want))


def test_a_residual_gradient_of_another_shape_is_refused():
    x, w, _, dout = _inputs((3, 80), torch.float32)
    _, x2, rstd = rmsnorm_triton.rms_norm_forward(x, w, EPS)
    with pytest.raises(ValueError, match="residual's gradient"):
        rmsnorm_triton.rms_norm_backward(dout, x2, w, rstd, 0.0, True, dres=dout[:2])


def test_fp32_keeps_the_norms_own_function_and_autograds_sum(monkeypatch):
    monkeypatch.setattr(rmsnorm_module, "use_triton", lambda *tensors: True)
    x, w, _, _ = _inputs((3, 80), torch.float32)
    x = x.requires_grad_()
    normed, residual = rms_norm_with_residual(x, w, EPS)
    assert residual is x and type(normed.grad_fn).__name__ == "RMSNormFunctionBackward"
    normed, residual = rms_norm_with_residual(x.detach().bfloat16().requires_grad_(), w.bfloat16(), EPS)
    assert type(residual.grad_fn).__name__ == "ResidualRMSNormFunctionBackward"


def test_public_function_on_cpu_is_the_reference_and_x_itself():
    x, w, _, _ = _inputs((3, 7, 80), torch.bfloat16)
    x, w = x.cpu(), w.cpu()
    normed, residual = rms_norm_with_residual(x, w, EPS, 1.0)
    assert residual is x and torch.equal(normed, rmsnorm_module.rms_norm_reference(x, w, EPS, 1.0))


@pytest.mark.parametrize("family", ["llama3_gqa_rope_scaling", "gemma2"])
def test_a_model_on_the_kernel_sums_in_the_norm_with_the_unfused_gradients(monkeypatch, family):
    """A tiny model whose norms take the kernel (Llama's pre-norms; Gemma 2's sandwich norms): its loss and every
    parameter's gradient equal those of the same model whose norms hand back ``x`` and leave the sum to autograd,
    and the autograd graph has no sum left for the norms' inputs."""
    monkeypatch.setattr(rmsnorm_module, "use_triton", lambda *tensors: True)
    _, model = make_pair(family)
    model.to(DEVICE, torch.bfloat16).train()  # 16-bit: the fused path's dtypes
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def run():
        model.zero_grad(set_to_none=True)
        with sdpa_kernel(SDPBackend.MATH):  # a deterministic attention backward on a GPU (flash's may not be)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls, apply = [], Fused.apply
    with monkeypatch.context() as m:
        m.setattr(Fused, "apply", lambda *a: calls.append(1) or apply(*a))
        fused_loss, fused = run()
    assert len(calls) == 2 * len(model.model.layers)  # each layer's two blocks
    with monkeypatch.context() as m:
        m.setattr(Fused, "apply", lambda x, w, eps, offset: (Unfused.apply(x, w, eps, offset), x))
        loss, unfused = run()
    assert torch.equal(fused_loss, loss) and fused.keys() == unfused.keys() and len(fused) > 0
    assert all(torch.equal(fused[n], unfused[n]) for n in fused)
    layer = model.model.layers[0]
    x = torch.randn(2, 3, model.config.hidden_size, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    normed, residual = layer.input_layernorm.with_residual(x)
    assert type(residual.grad_fn).__name__ == "ResidualRMSNormFunctionBackward" and residual.grad_fn is normed.grad_fn
