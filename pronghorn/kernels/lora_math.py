"""The arithmetic the LoRA ops share (``lora_linear``, ``lora_qkv``, ``lora_mlp``): the compute dtypes as PEFT and
autocast pick them, the rank-r matmuls of the forward and backward, and the bookkeeping of the fused Functions
(``apply(x, cdt, *flat projections)``). See ``lora_linear``'s docstring for the dtype rules.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .adapter_operands import stacked_operands
from .policy import DEFAULT_POLICY, KernelPolicy

_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)  # autocast never casts fp64


class LoRAProjection(NamedTuple):
    """One projection of a fused multi-projection op: frozen base (``weight`` [out, in], ``bias``) + adapter."""

    weight: object  # torch.Tensor or a quantized weight with .dequantize(dtype)
    bias: torch.Tensor | None
    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    scaling: float


# --- dtype and matmul helpers shared by the fused LoRA ops (lora_mlp, lora_qkv) ----------------------------


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type`` now, or None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def cast(t: torch.Tensor | None, cdt: torch.dtype | None) -> torch.Tensor | None:
    """``t`` as autocast would hand it to a matmul in ``cdt`` (None: unchanged)."""
    if t is None or cdt is None or t.dtype not in _AUTOCAST_ELIGIBLE:
        return t
    return t.to(cdt)


def no_autocast(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def dense(weight, cdt: torch.dtype | None) -> torch.Tensor:
    """The base weight as a tensor in the dtype its matmul runs in."""
    if not isinstance(weight, torch.Tensor):
        weight = weight.dequantize(cdt) if cdt is not None else weight.dequantize()
    return cast(weight, cdt)


def adapter_dtype(lora_A: torch.Tensor, cdt: torch.dtype | None) -> torch.dtype:
    return cdt if cdt is not None and lora_A.dtype in _AUTOCAST_ELIGIBLE else lora_A.dtype


def mm_scaled(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * (a @ b)`` as one matmul (beta=0: the uninitialised input is ignored)."""
    if scaling == 1.0:
        return a @ b
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=scaling)


# whether this torch's CUDA matmuls take ``out_dtype`` (cleared at the first that does not): what this torch can do,
# not a setting
_OUT_DTYPE = [True]


def grad_mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scaling: float = 1.0) -> torch.Tensor:
    """``scaling * (a @ b)`` as an adapter's gradient in ``dtype``, its parameter's. On CUDA a bf16/fp16 product
    for fp32 adapters is written in fp32 by the matmul itself (``out_dtype``): one kernel instead of a matmul and a
    cast (14 casts a layer's backward), and the fp32 sum is not rounded to the compute dtype first, so the gradient
    is nearer the exact one than PEFT's under autocast (within half a unit in the last place of the compute dtype).
    Elsewhere: the product in the operands' dtype, cast."""
    if dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16) and a.is_cuda and _OUT_DTYPE[0]:
        try:
            if scaling == 1.0:
                return torch.mm(a, b, out_dtype=dtype)
            return torch.addmm(a.new_empty((), dtype=dtype), a, b, beta=0, alpha=scaling, out_dtype=dtype)  # beta=0
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE[0] = False
    return mm_scaled(a, b, scaling).to(dtype)


def add_delta(y: torch.Tensor, xa: torch.Tensor, bs: torch.Tensor) -> None:
    """``y += (xa bs^T).to(y.dtype)`` in place: one matmul with accumulation when the dtypes agree."""
    if xa.dtype == y.dtype:
        y.addmm_(xa, bs.t())
    else:
        y.add_((xa @ bs.t()).to(y.dtype))


def adapter_input_grad(dx: torch.Tensor | None, p: torch.Tensor, a: torch.Tensor, x_dtype: torch.dtype):
    """``dx + (p a).to(x_dtype)``, accumulated in place into ``dx`` (the base's share, in ``x_dtype``) when the
    dtypes agree; ``dx`` None: the adapter's share alone."""
    if dx is None:
        return (p @ a).to(x_dtype)
    if p.dtype == dx.dtype:
        return dx.addmm_(p, a)
    return dx.add_((p @ a).to(x_dtype))


def base_input_grad(dy: torch.Tensor, w: torch.Tensor, x_dtype: torch.dtype,
                     into: torch.Tensor | None = None) -> torch.Tensor:
    """``(dy @ w).to(x_dtype)``; written into ``into`` (a spent buffer of the result's shape) when the dtypes
    allow a plain ``out=`` matmul."""
    if into is not None and dy.dtype == w.dtype == x_dtype == into.dtype and into.is_contiguous():
        torch.autograd.graph.increment_version(into)
        return torch.mm(dy, w, out=into)
    return (dy.to(w.dtype) @ w).to(x_dtype)


def shared_input_forward(x2: torch.Tensor, projs, cdt, adt):
    """The outputs [N, out_i] of several LoRA projections of one input ``x2`` [N, in]; the adapters' A are
    stacked, so ``x A^T`` for all of them is one matmul. Returns (outputs, xa [N, sum r], A stack, [s_i B_i])."""
    xb = cast(x2, cdt)
    a, bss = stacked_operands(projs, adt)
    xa = x2.to(adt) @ a.t()
    outs, start = [], 0
    for p, bs in zip(projs, bss):
        y = F.linear(xb, dense(p.weight, cdt), cast(p.bias, cdt))
        add_delta(y, xa[:, start:start + bs.shape[1]], bs)
        start += bs.shape[1]
        outs.append(y)
    return outs, xa, a, bss


def shared_input_backward(dys, x2, xa, a, bss, weights, scalings, cdt, need_x: bool, grad_dtype=None):
    """Gradients of ``shared_input_forward``: (dx or None, [dA_i], [dB_i]), the adapters' in ``grad_dtype`` (theirs;
    None: the compute dtype), by :func:`grad_mm`. The rank-r factors ``dY_i (s_i B_i)`` are stacked so ``dA`` and
    the adapters' share of ``dx`` are one matmul each, and every share of ``dx`` accumulates in place into one
    buffer."""
    dyas = [dy.to(a.dtype) for dy in dys]
    ranks = [bs.shape[1] for bs in bss]
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    gdt = grad_dtype or a.dtype
    dbs = [grad_mm(dya.t(), xa[:, st:st + r], gdt, s) for dya, st, r, s in zip(dyas, starts, ranks, scalings)]
    p = torch.cat([dya @ bs for dya, bs in zip(dyas, bss)], 1) if len(bss) > 1 else dyas[0] @ bss[0]
    das = grad_mm(p.t(), x2.to(a.dtype), gdt).split(ranks)
    dx = None
    if need_x:
        for dy, weight in zip(dys, weights):
            w = dense(weight, cdt)
            if dx is not None and dy.dtype == w.dtype == dx.dtype:
                dx.addmm_(dy, w)
            elif dx is not None:
                dx.add_(base_input_grad(dy, w, x2.dtype))
            else:
                dx = base_input_grad(dy, w, x2.dtype)
        dx = adapter_input_grad(dx, p, a, x2.dtype)
    return dx, das, dbs


def _flat(projs) -> list:
    return [t for p in projs for t in p]


def _unflat(flat) -> list[LoRAProjection]:
    return [LoRAProjection(*flat[i:i + 5]) for i in range(0, len(flat), 5)]


def _adapter_grads(das, dbs, dtypes, needs) -> list:
    """Per projection (None, None, dA, dB, None) for ``apply``'s flat argument list, in the adapters' dtypes
    (``dtypes``: (A's, B's) per projection); None where ``needs`` (needs_input_grad of that list) says so."""
    out = []
    for i, (da, db, (a_dtype, b_dtype)) in enumerate(zip(das, dbs, dtypes)):
        need_a, need_b = needs[5 * i + 2], needs[5 * i + 3]
        out += [None, None, da.to(a_dtype) if need_a else None, db.to(b_dtype) if need_b else None, None]
    return out


# --- the bookkeeping both fused Functions share: ``apply(x, cdt, *flat projections)`` --------------------------


def apply_fused(function, x: torch.Tensor, projs, policy: KernelPolicy = DEFAULT_POLICY):
    """``function.apply(x, cdt, *flat projections)`` with ``cdt`` the policy's compute dtype for ``x`` now."""
    return function.apply(x, policy.compute_dtype(x, projs[0].weight), *_flat(projs))


def fused_forward_inputs(x: torch.Tensor, cdt, flat):
    """A fused forward's prologue: (its projections, ``x`` as [N, in], the adapters' compute dtype)."""
    projs = _unflat(flat)
    return projs, x.reshape(-1, x.shape[-1]), adapter_dtype(projs[0].lora_A, cdt)


def save_fused(ctx, cdt, projs, *tensors) -> None:
    """Save ``tensors`` for the backward, and per projection its frozen base and scaling (``ctx.projs``, adapters
    dropped: the tensors hold their compute-dtype copies) and its adapters' dtypes (``ctx.dtypes``)."""
    ctx.save_for_backward(*tensors)
    ctx.projs = [p._replace(lora_A=None, lora_B=None) for p in projs]
    ctx.dtypes = [(p.lora_A.dtype, p.lora_B.dtype) for p in projs]
    ctx.cdt = cdt


def fused_grads(ctx, x: torch.Tensor, dx, das, dbs) -> tuple:
    """A fused backward's return value: dx (or None) shaped as ``x``, None for ``cdt``, then the adapters'."""
    grads = _adapter_grads(das, dbs, ctx.dtypes, ctx.needs_input_grad[2:])
    return (None if dx is None else dx.view(x.shape), None, *grads)
