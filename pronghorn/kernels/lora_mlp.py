"""The gated MLP ``down(silu(gate(x)) * up(x))`` with LoRA on all three projections, as one op.

Compared with the three ``lora_linear`` calls and ``swiglu`` it composes, it saves one [N, intermediate]
activation per layer: the SwiGLU output ``h`` is not kept for the backward (the down adapter's ``dA`` and the
SwiGLU backward need it, so the backward recomputes it from the saved ``gate``/``up`` with ``kernels.swiglu``,
whose CUDA kernel costs one elementwise pass). Saved: ``x``, ``gate``, ``up`` and the rank-r products. The
gate/up adapters share one ``x A^T`` matmul and one ``dA`` matmul, and both projections' input gradients
accumulate in place into one buffer (see ``lora_qkv`` for the same scheme).

Same dtype rules as ``lora_linear`` (PEFT's, autocast's); no dropout (``fusable_projections``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .lora_linear import LoRAProjection, lora_linear_reference
from .lora_math import apply_fused, fused_forward_inputs, fused_grads, no_autocast, save_fused
from .lora_math import shared_input_backward, shared_input_forward
from .swiglu import swiglu
from .policy import DEFAULT_POLICY, KernelPolicy
from .triton_support import use_triton


def lora_mlp_reference(x: torch.Tensor, gate: LoRAProjection, up: LoRAProjection, down: LoRAProjection,
                       cdt: torch.dtype | None = None, reference: bool = False):
    """The composition the fused op replaces: three reference LoRA linears around ``swiglu`` (``cdt``: the
    policy's compute dtype, ``reference``: every op's reference, as ``lora_linear_reference``)."""
    g, u = (lora_linear_reference(x, *p, cdt=cdt, reference=reference) for p in (gate, up))
    h = swiglu(g, u, policy=KernelPolicy(reference=reference))
    return lora_linear_reference(h, *down, cdt=cdt, reference=reference)


class LoRAMLPFunction(torch.autograd.Function):
    """``apply(x, cdt, *gate, *up, *down)`` (each projection's five ``LoRAProjection`` fields) -> y."""

    @staticmethod
    def forward(ctx, x, cdt, *flat):
        (gate, up, down), x2, adt = fused_forward_inputs(x, cdt, flat)
        with no_autocast(x.device.type):
            (g, u), xa, a, bss = shared_input_forward(x2, (gate, up), cdt, adt)
            with torch.no_grad():
                h = swiglu(g, u)
            (y,), xa_d, a_d, (bs_d,) = shared_input_forward(h, (down,), cdt, adt)
        del h
        save_fused(ctx, cdt, (gate, up, down), x, g, u, xa, a, *bss, xa_d, a_d, bs_d)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, g, u, xa, a, bs_g, bs_u, xa_d, a_d, bs_d = ctx.saved_tensors
        gate, up, down = ctx.projs
        x2 = x.reshape(-1, x.shape[-1])
        with no_autocast(x.device.type):
            with torch.enable_grad():
                g_, u_ = g.detach().requires_grad_(), u.detach().requires_grad_()
                h = swiglu(g_, u_)
            dh, (da_d,), (db_d,) = shared_input_backward(
                [dy.reshape(-1, dy.shape[-1])], h.detach(), xa_d, a_d, [bs_d], [down.weight], [down.scaling],
                ctx.cdt, True, ctx.dtypes[0][0],
            )
            dg, du = torch.autograd.grad(h, (g_, u_), dh)
            del h, dh
            dx, (da_g, da_u), (db_g, db_u) = shared_input_backward(
                [dg, du], x2, xa, a, [bs_g, bs_u], [gate.weight, up.weight], [gate.scaling, up.scaling], ctx.cdt,
                ctx.needs_input_grad[0], ctx.dtypes[0][0],
            )
        return fused_grads(ctx, x, dx, [da_g, da_u, da_d], [db_g, db_u, db_d])


def lora_mlp(x: torch.Tensor, gate: LoRAProjection, up: LoRAProjection, down: LoRAProjection,
             policy: KernelPolicy = DEFAULT_POLICY) -> torch.Tensor:
    """``down(swiglu(gate(x), up(x)))`` with each projection a LoRA linear on a frozen base (see
    ``fusable_projections``). CUDA tensors take ``LoRAMLPFunction``, anything else the reference."""
    if policy.reference or not use_triton(x):
        return lora_mlp_reference(x, gate, up, down, policy.compute_dtype(x, gate.weight), policy.reference)
    return apply_fused(LoRAMLPFunction, x, (gate, up, down), policy)
