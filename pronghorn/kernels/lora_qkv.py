"""The q/k/v projections of attention as one LoRA op over their shared input.

The base weights stay three separate tensors (parameter names are Hugging Face's; a concatenated copy
would cost ``(q + 2 kv) x hidden`` more memory per layer for one larger matmul). What fusing buys:

- forward: ``x A^T`` for the three adapters is one matmul against the stacked A's ([3r, in]), so ``x`` is
  read once for all adapters; each delta is added to its base output inside the base matmul's accumulation;
- backward: ``dA`` of all three is one matmul ``[dQ sB_q, dK sB_k, dV sB_v]^T x``; ``dX`` is accumulated in
  place (three base matmuls and one stacked adapter matmul into one buffer) instead of three [N, in]
  gradients that autograd then adds together;
- saved for backward: ``x`` (once) and ``x A^T`` [N, 3r]; the rest are the adapters' small matrices.

Same dtype rules as ``lora_linear`` (PEFT's, autocast's). No dropout: ``fusable_projections`` only offers
projections with none to apply.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .lora_linear import LoRAProjection, lora_linear_reference
from .lora_math import apply_fused, fused_forward_inputs, fused_grads, no_autocast, save_fused
from .lora_math import shared_input_backward, shared_input_forward
from .policy import DEFAULT_POLICY, KernelPolicy
from .triton_support import use_triton


def lora_qkv_reference(x: torch.Tensor, q: LoRAProjection, k: LoRAProjection, v: LoRAProjection,
                       cdt: torch.dtype | None = None, reference: bool = False):
    """The three reference LoRA linears the fused op replaces (``cdt``, ``reference``: as
    ``lora_linear_reference``)."""
    return tuple(lora_linear_reference(x, *p, cdt=cdt, reference=reference) for p in (q, k, v))


class LoRAQKVFunction(torch.autograd.Function):
    """``apply(x, cdt, *q, *k, *v)`` (each projection's five ``LoRAProjection`` fields) -> (q, k, v)."""

    @staticmethod
    def forward(ctx, x, cdt, *flat):
        projs, x2, adt = fused_forward_inputs(x, cdt, flat)
        with no_autocast(x.device.type):
            outs, xa, a, bss = shared_input_forward(x2, projs, cdt, adt)
        save_fused(ctx, cdt, projs, x, xa, a, *bss)
        lead = x.shape[:-1]
        return tuple(y.view(*lead, y.shape[-1]) for y in outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *dys):
        x, xa, a, *bss = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dys = [dy.reshape(-1, dy.shape[-1]) for dy in dys]
        projs = ctx.projs
        with no_autocast(x.device.type):
            dx, das, dbs = shared_input_backward(
                dys, x2, xa, a, bss, [p.weight for p in projs], [p.scaling for p in projs], ctx.cdt,
                ctx.needs_input_grad[0], ctx.dtypes[0][0],
            )
        return fused_grads(ctx, x, dx, das, dbs)


def lora_qkv(x: torch.Tensor, q: LoRAProjection, k: LoRAProjection, v: LoRAProjection,
             policy: KernelPolicy = DEFAULT_POLICY):
    """(q, k, v) = the three LoRA projections of ``x`` [..., hidden], each [..., out_i]; the same values as
    ``lora_linear`` on each, with adapters on frozen bases (see ``fusable_projections``). CUDA tensors take
    ``LoRAQKVFunction``, anything else the reference."""
    if policy.reference or not use_triton(x):
        return lora_qkv_reference(x, q, k, v, policy.compute_dtype(x, q.weight), policy.reference)
    return apply_fused(LoRAQKVFunction, x, (q, k, v), policy)
