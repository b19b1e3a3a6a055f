"""Shared pieces of the fused-LoRA kernel tests (tests/kernels/test_lora_*.py): random projections, running an
op forward and backward, error measures, the fp64 oracle, gradcheck over the adapters and NF4 bases.

bf16 tolerances are stated against the exact function (fp64 on the same rounded inputs): the fused op must be
within one bf16 ulp-at-the-largest-element budget of exact wherever the unfused reference is, i.e.
``err(fused) <= 2 * err(reference) + 2^-9`` (relative to the largest exact element). Both round each matmul
output to bf16 once; they differ only in where the rank-r delta is added (inside the base matmul's fp32
accumulation here, after rounding in the reference), so neither is systematically closer to exact.
Observed: the fused error is at most 0.85x the reference's + 2^-9 (and at most 0.8% of the largest element).
"""

from __future__ import annotations

import importlib

import torch

from pronghorn.kernels.lora_linear import LoRAProjection
from pronghorn.kernels.nf4 import quantize_nf4

BF16_SLACK = 2**-9
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the fused Functions are plain torch: any device


def randn(*shape, generator, dtype=torch.float32, requires_grad=False):
    """CPU-seeded normal values on DEVICE."""
    return torch.randn(*shape, generator=generator, dtype=dtype).to(DEVICE).requires_grad_(requires_grad)


def projection(n_in, n_out, r, gen, base=torch.float32, adapter=torch.float32, scaling=2.0, bias=False):
    """A LoRAProjection with random frozen base and trainable adapter (B nonzero, so every gradient is)."""
    w = (randn(n_out, n_in, generator=gen) / n_in**0.5).to(base)
    b = (randn(n_out, generator=gen) * 0.1).to(base) if bias else None
    a = (randn(r, n_in, generator=gen) / n_in**0.5).to(adapter).requires_grad_()
    bb = (randn(n_out, r, generator=gen) * 0.5).to(adapter).requires_grad_()
    return LoRAProjection(w, b, a, bb, scaling)


def as_dtype(projs, base, adapter):
    """The same projections with the base in ``base`` and the adapters (fresh leaves) in ``adapter``."""
    return [LoRAProjection(p.weight.to(base), None if p.bias is None else p.bias.to(base),
                           p.lora_A.detach().to(adapter).requires_grad_(),
                           p.lora_B.detach().to(adapter).requires_grad_(), p.scaling) for p in projs]


def run(fn, x, projs, x_grad=True, seed=7):
    """Outputs and gradients [outputs..., dx (or None), dA_0, dB_0, dA_1, ...] of ``fn(x, *projs)`` under a
    fixed random upstream gradient (fp32, cast to each output's dtype)."""
    x = x.detach().requires_grad_(x_grad)
    for p in projs:
        p.lora_A.grad = p.lora_B.grad = None
    outs = fn(x, *projs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    grads = [randn(*o.shape, generator=gen).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs] + [x.grad] + [t.grad for p in projs for t in (p.lora_A, p.lora_B)]


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in fp64."""
    got, ref = got.detach().double(), ref.detach().double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def assert_all_close(got, ref, tol):
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        if r is None:
            assert g is None, f"item {i}: expected no gradient"
            continue
        assert g.dtype == r.dtype and g.shape == r.shape, (i, g.dtype, r.dtype, g.shape, r.shape)
        assert rel(g, r) <= tol, f"item {i}: {rel(g, r):.3g} > {tol}"


def assert_bf16_as_exact_as_reference(got, ref, exact):
    """Per item: same dtype/shape as the reference, and ``err(got) <= 2 err(ref) + 2^-9`` against fp64."""
    for i, (g, r, e) in enumerate(zip(got, ref, exact)):
        if r is None:
            assert g is None
            continue
        assert g.dtype == r.dtype and g.shape == r.shape, (i, g.dtype, r.dtype)
        err_got, err_ref = rel(g, e), rel(r, e)
        assert err_got <= 2 * err_ref + BF16_SLACK, f"item {i}: fused {err_got:.3g} vs reference {err_ref:.3g}"


def exact_fp64(fn, x, projs, adapter_rounding=None):
    """``run`` of ``fn`` in fp64 on the same (rounded) inputs: the exact function the bf16 bound is stated against;
    ``adapter_rounding`` rounds the adapters first (as autocast does)."""
    if adapter_rounding is not None:
        projs = as_dtype(projs, projs[0].weight.dtype, adapter_rounding)
    return run(fn, x.double(), as_dtype(projs, torch.float64, torch.float64))


def gradcheck_adapters(fn, x, projs) -> bool:
    """``torch.autograd.gradcheck`` of ``fn(x, *projs)`` with respect to ``x`` and every adapter matrix (fp64)."""

    def f(x, *adapters):
        return fn(x, *[p._replace(lora_A=a, lora_B=b) for p, a, b in zip(projs, adapters[0::2], adapters[1::2])])

    return torch.autograd.gradcheck(f, (x, *[t for p in projs for t in (p.lora_A, p.lora_B)]))


def nf4_and_dequantized(projs):
    """(the projections with NF4-quantized bases, the same with those bases dequantized: the reference's input)."""
    quantized = [p._replace(weight=quantize_nf4(p.weight, dtype=torch.float32)) for p in projs]
    return quantized, [p._replace(weight=p.weight.dequantize()) for p in quantized]


_FUSED_MODULES = [importlib.import_module(f"pronghorn.kernels.{m}") for m in ("lora_linear", "lora_mlp", "lora_qkv")]
_FUNCTIONS = dict(zip(("LoRALinearFunction", "LoRAMLPFunction", "LoRAQKVFunction"), _FUSED_MODULES))


def force_fused(monkeypatch, fused=True) -> dict:
    """Force the LoRA ops' device dispatch (CPU tensors would take the references) to the fused Functions, or
    away from them; returns their call counts by name, counted from here on."""
    calls = dict.fromkeys(_FUNCTIONS, 0)
    for mod in _FUSED_MODULES:
        monkeypatch.setattr(mod, "use_triton", lambda *tensors: fused)
    for name, mod in _FUNCTIONS.items():
        fn = getattr(mod, name)
        original = fn.apply

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(fn, "apply", counted)
    return calls
