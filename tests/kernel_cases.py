"""Shared pieces of the elementwise and row kernel tests (tests/kernels/test_rmsnorm.py, test_swiglu.py,
test_geglu.py): error measures, the bounds those tests state, and gated-activation inputs and oracles.

The stated bounds, and why, are in each test module's docstring; in short:
- forward: fp32 within 1e-5 relative (+ 1e-7); 16-bit bit-identical on >= 99% of elements and within 2 ulps;
- gradients: fp32 within 1e-5 of the reference's largest element; bf16 within 2^-7 (one ulp at the largest
  element) of the exact fp64 gradient and within 2^-6 of the bf16 reference (which itself rounds earlier).
"""

from __future__ import annotations

import torch

from pronghorn.kernels import IGNORE_INDEX

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """16-bit float patterns mapped to integers that are consecutive for consecutive values."""
    i = x.view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


def rel_to_max(a, b) -> float:
    """max |a - b| / max |b|, in fp64."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_close_ulps(out, ref):
    """Forward bound: fp32 within 1e-5 |ref| + 1e-7; 16-bit within 2 ulps, bit-identical on >= 99%."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)
    else:
        ulps = (ordered_bits(out) - ordered_bits(ref)).abs()
        assert ulps.max().item() <= 2, f"{ulps.max().item()} ulps from the reference"
        assert (ulps == 0).float().mean().item() >= 0.99


def assert_grad(got, ref, exact):
    """Gradient bound: fp32 within 1e-5 of the reference; bf16 within 2^-7 of exact and 2^-6 of the reference
    (each relative to the largest element)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if got.dtype == torch.float32:
        assert rel_to_max(got, ref) <= 1e-5
    else:
        assert rel_to_max(got, exact) <= 2**-7, "more than 1 bf16 ulp (of the largest element) from exact"
        assert rel_to_max(got, ref) <= 2**-6


# --- gated activations: act(gate) * up ------------------------------------------------------------------------


def gated_inputs(shape, dtype, seed=0):
    """(gate ~ N(0, 3^2), up, dy ~ N(0, 1)) in ``dtype`` on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    gate, up, dy = (torch.randn(shape, generator=g) * s for s in (3, 1, 1))
    return gate.to(dtype).to(DEVICE), up.to(dtype).to(DEVICE), dy.to(dtype).to(DEVICE)


def run_gated(fn, gate, up, dy, *args):
    """(y, d gate, d up) of ``fn(gate, up, *args)`` backward from ``dy``, on fresh leaves."""
    gate, up = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    y = fn(gate, up, *args)
    y.backward(dy)
    return y.detach(), gate.grad, up.grad


def exact_gated_grads(activation, gate, up, dy):
    """fp64 gradients of ``activation(gate) * up`` with the reference's rounding of the activation to the gate's
    dtype taken as the identity (as autograd does)."""
    g64, u64 = (t.detach().cpu().double().requires_grad_() for t in (gate, up))
    act = activation(g64)
    act = act + (act.to(gate.dtype).double() - act).detach()
    (act * u64).backward(dy.cpu().double())
    return g64.grad, u64.grad


# --- per-token log-prob heads (test_linear_logprobs, test_streamed_logprobs) ---

N = 23
DEV = DEVICE


def logprob_inputs(V, H, seed=0, dtype=torch.float32):
    """(hidden [N, H], head weight [V, H], labels with a third ignored, upstream gradient) on DEV."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[: N // 3]] = IGNORE_INDEX
    labels[0] = IGNORE_INDEX
    upstream = torch.randn(N, generator=g)
    return hidden.to(DEV), weight.to(DEV), labels.to(DEV), upstream.to(DEV)


def run_logprobs(fn, hidden, weight, labels, upstream, train_weight, **kw):
    """(log-probs, d hidden, d weight or None) of ``fn(hidden, weight, labels)`` under ``upstream``."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(train_weight)
    out = fn(h, w, labels, **kw)
    (out * upstream).sum().backward()
    return out.detach(), h.grad, w.grad
