"""Linear layer with an optional low-rank adapter: y = x W^T + b + s * dropout(x) A^T B^T.

``lora_linear_reference`` is PEFT's computation in plain PyTorch (the test oracle). ``LoRALinearFunction``
computes the same function with a hand-written backward for a frozen base: it saves only the input ``x``
(usually already kept alive by the layer before), the rank-r product ``x A^T`` and the adapter matrices;
its backward forms the rank-r products first (``dY (sB)`` [N, r]) and accumulates the adapter's share of
``dX`` into the base's in place, so no [N, in] or [N, out] temporary of the adapter ever exists.

Dtypes follow PEFT and autocast exactly, with the compute dtype the kernel policy gives (``kernels.policy``):
under autocast (the trainer's bf16 on CUDA) every matmul runs in the autocast dtype, as ``F.linear`` does there;
without it, by default, an adapter on a bf16 base runs in bf16 just the same (as if autocast were on), or, with
``adapter_math="adapter"``, in the adapter's own dtype (fp32 adapters on a bf16 base: the delta is computed in
fp32 and cast back, PEFT without autocast). The Function resolves those dtypes once, outside, and casts
explicitly with autocast switched off inside its forward and backward; so the backward computes in the
forward's dtypes whatever autocast state the autograd engine runs it in (the job ``torch.amp.custom_bwd`` does,
here for any device). The reference takes the same compute dtype (it runs under autocast in that dtype).

The base weight may be a tensor or a quantized weight with ``dequantize(dtype)`` (``kernels.nf4.NF4Weight``):
it is dequantized in the forward and again in the backward, never saved dequantized.

``output_unused=True`` is for a recomputation whose result is thrown away (the last projection of a decoder
layer replayed for its backward, models/recompute.py): the forward saves what the backward
needs (``x A^T`` included) but skips the base matmul, the adapter's delta and the dequantization, and returns an
uninitialised tensor of the output's shape and dtype. The gradients are the same computation as without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .adapter_operands import adapter_operands
from .lora_math import (LoRAProjection, adapter_dtype, adapter_input_grad, add_delta, base_input_grad, cast, dense,
                        grad_mm, no_autocast)
from .policy import DEFAULT_POLICY, KernelPolicy
from .triton_support import use_triton

__all__ = ["LoRALinearFunction", "LoRAProjection", "fusable_projections", "lora_linear", "lora_linear_reference"]


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
    cdt: torch.dtype | None = None,
    reference: bool = False,
) -> torch.Tensor:
    """Plain PyTorch LoRA linear. The adapter runs in its own dtype (as PEFT does) and is cast back; ``cdt``
    (``KernelPolicy.compute_dtype``): every matmul in that dtype, as under autocast (run under autocast).
    ``reference``: an NF4 base is dequantized by the PyTorch reference too (else by its kernel on CUDA)."""
    device = x.device.type
    if cdt is not None and not torch.is_autocast_enabled(device):
        with torch.autocast(device, dtype=cdt):
            return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout, training, None, reference)
    if not isinstance(weight, torch.Tensor):  # a quantized base (NF4Weight): dequantize to its compute dtype
        weight = weight.dequantize(reference=reference)
    y = F.linear(x, weight, bias)
    if lora_A is None:
        return y
    h = x.to(lora_A.dtype)
    if dropout and training:
        h = F.dropout(h, p=dropout, training=True)
    delta = F.linear(F.linear(h, lora_A), lora_B) * scaling
    return y + delta.to(y.dtype)


def fusable_projections(layers, training: bool) -> list[LoRAProjection] | None:
    """The ``LoRAProjection`` of each layer when all can run in one fused LoRA op, else None.

    ``layers`` are projection modules with ``weight``, ``bias``, ``lora_A``, ``lora_B``, ``lora_scaling``,
    ``lora_dropout`` and ``lora_enabled`` (``models.linear.Linear``). Fusable: every layer has an enabled
    adapter, no dropout to apply (fused ops apply none), a frozen base, and the adapters share dtype and device.
    """
    projs = []
    for m in layers:
        if m.lora_A is None or not m.lora_enabled or (training and m.lora_dropout) or _trains_base(m.weight, m.bias):
            return None
        projs.append(LoRAProjection(m.weight, m.bias, m.lora_A, m.lora_B, m.lora_scaling))
    a0 = projs[0].lora_A
    if any(p.lora_A.dtype != a0.dtype or p.lora_A.device != a0.device for p in projs):
        return None
    return projs


class LoRALinearFunction(torch.autograd.Function):
    """``apply(x, weight, bias, lora_A, lora_B, scaling, dropout, cdt[, output_unused[, owns_input]])``: the LoRA
    linear with a frozen base.

    ``dropout`` is the probability applied to the adapter's input (0 outside training); ``cdt`` the autocast
    dtype at the call (``autocast_dtype``) or None; ``output_unused``: see the module docstring;
    ``owns_input``: nothing else uses ``x``, so the backward writes d x over the saved ``x`` once ``d lora_A``
    (the last use of ``x``) is formed (one [tokens, in] buffer less at the backward's peak; the saved tensor's
    version is bumped, so a second backward through it fails loudly).
    Gradients: x (unless it needs none), lora_A, lora_B;
    the base ``weight`` and ``bias`` must not require grad.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout, cdt, output_unused=False, owns_input=False):
        dev = x.device.type
        x2 = x.reshape(-1, x.shape[-1])
        adt = adapter_dtype(lora_A, cdt)
        keep = keep_scale = None
        with no_autocast(dev):
            xb = cast(x2, cdt)
            y = xb.new_empty(x2.shape[0], lora_B.shape[0]) if output_unused else \
                F.linear(xb, dense(weight, cdt), cast(bias, cdt))
            a, bs = adapter_operands(lora_A, lora_B, scaling, adt)
            if dropout:
                # the reference's dropout call on a tensor of the same shape and dtype: same random stream
                noise = F.dropout(torch.ones(x2.shape, dtype=lora_A.dtype, device=x.device), dropout, True)
                keep = noise != 0
                keep_scale = noise.amax() if noise.numel() else noise.new_ones(())  # 1 / (1 - p) as dropout rounds it
                xin = (x2.to(lora_A.dtype) * noise).to(adt)
            else:
                xin = x2.to(adt)
            xa = xin @ a.t()
            if not output_unused:
                add_delta(y, xa, bs)
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        w_saved = weight if isinstance(weight, torch.Tensor) and need_x else None
        ctx.save_for_backward(x if need_a else None, xa if need_b else None, a, bs, w_saved, keep, keep_scale)
        ctx.qweight = None if isinstance(weight, torch.Tensor) or not need_x else weight
        ctx.scaling, ctx.cdt, ctx.a_dtype, ctx.b_dtype = scaling, cdt, lora_A.dtype, lora_B.dtype
        ctx.x_shape, ctx.x_dtype, ctx.owns_input = x.shape, x.dtype, owns_input
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, xa, a, bs, weight, keep, keep_scale = ctx.saved_tensors
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        dx = da = db = None
        dy2 = dy.reshape(-1, dy.shape[-1])
        with no_autocast(dy.device.type):
            dya = dy2.to(a.dtype)
            if need_b:
                db = grad_mm(dya.t(), xa, ctx.b_dtype, ctx.scaling)
            if need_a or need_x:
                p = dya @ bs  # s dY B  [N, r]
                noise = None if keep is None else keep.to(ctx.a_dtype) * keep_scale
            if need_a:
                x2 = x.reshape(-1, x.shape[-1])
                xin = x2.to(a.dtype) if noise is None else (x2.to(ctx.a_dtype) * noise).to(a.dtype)
                da = grad_mm(p.t(), xin, ctx.a_dtype)
            if need_x:
                w = dense(weight if ctx.qweight is None else ctx.qweight, ctx.cdt)
                into = x.reshape(-1, x.shape[-1]) if ctx.owns_input and x is not None else None
                dx = base_input_grad(dy2, w, ctx.x_dtype, into)
                if noise is None:
                    dx = adapter_input_grad(dx, p, a, ctx.x_dtype)
                else:
                    dx = dx + ((p @ a).to(ctx.a_dtype) * noise).to(ctx.x_dtype)
                dx = dx.view(ctx.x_shape)
        return dx, None, None, da, db, None, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
    output_unused: bool = False,
    owns_input: bool = False,
    policy: KernelPolicy = DEFAULT_POLICY,
) -> torch.Tensor:
    """The single entry point model code calls for every projection (with or without an adapter).

    CUDA inputs with an adapter on a frozen base (weight and bias need no gradient) take
    ``LoRALinearFunction``; anything else (CPU tensors, no adapter, a base being trained) the reference.
    Dispatch is by device, as for every kernel (``use_triton``): the CPU keeps PEFT's exact op sequence; a
    reference ``policy`` takes the reference everywhere.
    ``output_unused``: the caller throws the result's values away (see the module docstring); only the fast
    path uses the hint, the reference computes the output anyway. ``owns_input``: nothing else uses ``x``; the
    fast path's backward may then write d x over it (``LoRALinearFunction``). ``policy``: the adapters' compute
    dtype (``kernels.policy``), the same for both paths.
    """
    if lora_A is None:
        return lora_linear_reference(x, weight, bias, None, None, scaling, reference=policy.reference)
    cdt = policy.compute_dtype(x, weight)
    if policy.reference or _trains_base(weight, bias) or not use_triton(x):
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout, training, cdt,
                                     policy.reference)
    p = dropout if training else 0.0
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, p, cdt, output_unused, owns_input)


def _trains_base(weight, bias) -> bool:
    return (isinstance(weight, torch.Tensor) and weight.requires_grad) or (bias is not None and bias.requires_grad)
