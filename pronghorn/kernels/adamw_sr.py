"""One AdamW step on a bfloat16 weight with fp32 or bf16 moments, the result stochastically rounded to bf16.

The PyTorch reference (:func:`adamw_sr_step_reference`, the CPU path and the test oracle) and the Triton kernel
(adamw_sr_triton.py, one pass over the weight, gradient and moments on CUDA) compute the same bits: the same fp32
operations in the same order, each rounded once (no fused multiply-add), and the same rounding noise, which is a
hash of the element's index and a ``key`` rather than a generator's stream, so that both can draw it.

Stochastic rounding: the fp32 value's bit pattern plus a uniform 16-bit integer, truncated to its top 16 bits
(bfloat16), rounds up with probability equal to the distance from the value below in units of the bf16 spacing,
so the rounding is unbiased. A NaN stays NaN.

bf16 moments (``optim="adamw_bf16_sr_bf16_moments"``, 4 bytes of state per weight instead of 8) are rounded the
same way, each with its own noise stream (:func:`moment_keys`). Rounded to nearest, as torch's AdamW does with bf16
state, the second moment cannot decay: ``beta2 * v`` with beta2 = 0.999 is within half a bf16 spacing of ``v``,
so it rounds back to ``v``, and a moment that once saw a large gradient stays large. Stochastic rounding decays it
in expectation, as fp32 does.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_LOW16 = -(1 << 16)  # as int32: 0xFFFF0000


def rounding_noise(n: int, key: int, device) -> torch.Tensor:
    """Uniform 16-bit integers (int32) for elements ``0 .. n-1``, a function of (index, ``key``): an integer hash
    in int64 arithmetic that never overflows (multipliers below 2**31 on values below 2**32)."""
    x = (torch.arange(n, dtype=torch.int64, device=device) & _M32) * 0x27D4EB2F + (key & 0x7FFFFFFF)
    x &= _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _M32
    x ^= x >> 16
    return (x >> 16).to(torch.int32)


def stochastic_round_bf16(x: torch.Tensor, key: int) -> torch.Tensor:
    """``x`` (fp32) rounded to bfloat16 up or down, unbiased (``E[result] == x``); the draws are a function of
    ``key`` and each element's position in ``x`` (flattened)."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16 takes float32, got {x.dtype}")
    noise = rounding_noise(x.numel(), key, x.device).view(x.shape)
    rounded = ((x.view(torch.int32) + noise) & _LOW16).view(torch.float32)
    return torch.where(x.isnan(), x, rounded).to(torch.bfloat16)  # the low bits are zero: exact


def adamw_sr_constants(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                       step: int) -> tuple[float, ...]:
    """The step's scalars as the kernel and the reference take them: (decay, 1 - beta1, beta2, 1 - beta2,
    sqrt(bias correction 2), eps, -lr / bias correction 1)."""
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    return 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, bias2 ** 0.5, eps, -lr / bias1


def moment_keys(key: int) -> tuple[int, int]:
    """The noise keys of the first and second moment when they are stored in bf16 (31 bits each, apart from
    ``key``, the weight's)."""
    return (key * 3 + 1) % 2_147_483_647, (key * 5 + 2) % 2_147_483_647


def adamw_sr_step_reference(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                            exp_avg_sq: torch.Tensor, key: int, constants: tuple[float, ...]) -> None:
    """In place: AdamW on bf16 ``weight``, the weight stochastically rounded. The moments ``exp_avg`` /
    ``exp_avg_sq`` are fp32, or bf16 (both): then they are read as fp32 and stochastically rounded back."""
    decay, w1, beta2, w2, bias2_sqrt, eps, neg_step = constants
    w, g = weight.float() * decay, grad.float()
    m0, v0 = exp_avg.float(), exp_avg_sq.float()
    m = m0 + (g - m0) * w1
    v = v0 * beta2 + (g * g) * w2
    w = w + (m / (v.sqrt() / bias2_sqrt + eps)) * neg_step
    if exp_avg.dtype == torch.bfloat16:
        key_m, key_v = moment_keys(key)
        m, v = stochastic_round_bf16(m, key_m), stochastic_round_bf16(v, key_v)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    weight.copy_(stochastic_round_bf16(w, key))


def adamw_sr_step(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  key: int, constants: tuple[float, ...]) -> None:
    """:func:`adamw_sr_step_reference`, on CUDA as one Triton kernel (contiguous tensors)."""
    from .triton_support import use_triton

    tensors = (weight, grad, exp_avg, exp_avg_sq)
    if exp_avg.dtype != exp_avg_sq.dtype or exp_avg.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"AdamW moments must be both fp32 or both bf16, got {exp_avg.dtype} and {exp_avg_sq.dtype}")
    if use_triton(*tensors) and all(t.is_contiguous() for t in tensors):
        from .adamw_sr_triton import adamw_sr_step_triton

        return adamw_sr_step_triton(weight, grad, exp_avg, exp_avg_sq, key, constants)
    return adamw_sr_step_reference(weight, grad, exp_avg, exp_avg_sq, key, constants)
