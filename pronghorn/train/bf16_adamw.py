"""AdamW for bfloat16 weights: fp32 moments, the update computed in fp32, then written back to the bf16 weight.

Plain AdamW on bf16 weights (torch's, with bf16 moments) rounds every updated weight to the nearest bf16 value.
An update smaller than half a bf16 spacing (2**-8 of the weight: 4e-3 of a weight near 1, 8e-5 of one near
0.02) is then lost entirely, step after step: small learning rates stall. Two cures, both here:

- ``rounding="stochastic"`` (``optim="adamw_bf16_sr"``): the fp32 result is rounded up or down to a neighbouring
  bf16 value with probabilities that make the rounding unbiased (its mean is the fp32 value), so small updates
  survive on average. Memory: the bf16 weight + two fp32 moments, 10 bytes per trained weight.
- ``rounding="stochastic", moments="bf16"`` (``optim="adamw_bf16_sr_bf16_moments"``): the moments are kept in
  bf16 too and stochastically rounded as the weight is (the step's math stays fp32), 6 bytes per trained weight:
  the memory of torch's AdamW on bf16 weights (Unsloth's full fine-tuning), without its round-to-nearest, under
  which small updates are lost and the second moment cannot decay (kernels/adamw_sr.py).
- ``rounding="master"`` (``optim="adamw_bf16_master"``): an fp32 master copy of each weight takes the updates;
  the bf16 weight is its nearest rounding. Exact AdamW on the master, 14 bytes per trained weight.

The bf16 step with stochastic rounding is one kernel (kernels/adamw_sr.py: a PyTorch reference on the CPU, one
Triton pass on CUDA). Its rounding noise is counter-based: a hash of each element's index and a key made of
(``seed``, the weight's index among the optimizer's parameters, its step), so it needs no saved generator state: a resumed run rounds as
the uninterrupted one, and the per-parameter optimizers of :mod:`pronghorn.train.step_in_backward` (each told
its parameter's index, ``first_index``) draw what one optimizer over all of them would.
"""

from __future__ import annotations

import torch

from ..errors import PronghornError
from ..kernels.adamw_sr import adamw_sr_constants, adamw_sr_step

ROUNDINGS = ("stochastic", "master")
MOMENTS = ("fp32", "bf16")


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments; torch.optim.AdamW's math) with fp32 state (bf16 with
    ``moments="bf16"``) for weights of any dtype; a bf16 weight is written back with ``rounding`` (module doc). Weights of other dtypes
    are updated in fp32 and cast back (exact for fp32 weights). ``moments="bf16"``: a bf16 weight's moments are
    bf16, stochastically rounded (with ``rounding="stochastic"`` only); other weights keep fp32 moments."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rounding: str = "stochastic", seed: int = 0, first_index: int = 0,
                 moments: str = "fp32"):
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        if moments not in MOMENTS or (moments == "bf16" and rounding != "stochastic"):
            raise ValueError(f"moments must be one of {MOMENTS} ('bf16' with stochastic rounding only), "
                             f"got {moments!r} with rounding {rounding!r}")
        self.moments = moments
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.rounding, self.seed, self.first_index = rounding, int(seed), int(first_index)
        if any(hasattr(p, "full_tensor") for g in self.param_groups for p in g["params"]):
            raise PronghornError("optim adamw_bf16_sr / adamw_bf16_master runs in one process: these parameters are "
                                 "FSDP shards (under torchrun use optim='adamw_torch_fused')")

    def _key(self, index: int, step: int) -> int:
        """The rounding noise's key of weight ``index`` at ``step`` (31 bits)."""
        return ((self.seed * 1_000_003 + index) * 1_000_033 + step) % 2_147_483_647

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = self.first_index - 1
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self._moment_dtype(p),
                                                        memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                    if self._keeps_master(p):
                        state["master"] = p.detach().float()
                state["step"] += 1
                step = int(state["step"])
                if p.dtype == torch.bfloat16 and self.rounding == "stochastic":
                    adamw_sr_step(p.detach(), p.grad, state["exp_avg"], state["exp_avg_sq"], self._key(index, step),
                                  adamw_sr_constants(lr, beta1, beta2, eps, wd, step))
                    continue
                master = state.get("master")
                weight = master if master is not None else p.detach().float()
                _adamw_update(weight, p.grad.float(), state["exp_avg"], state["exp_avg_sq"], step, lr, beta1,
                              beta2, eps, wd)
                p.copy_(weight)  # round to nearest (or exact for fp32)
        return loss

    def _moment_dtype(self, p: torch.Tensor) -> torch.dtype:
        return torch.bfloat16 if self.moments == "bf16" and p.dtype == torch.bfloat16 else torch.float32

    def _keeps_master(self, p: torch.Tensor) -> bool:
        return self.rounding == "master" and p.dtype != torch.float32


def _adamw_update(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step on fp32 ``weight`` in place, in the order torch.optim.AdamW's single-tensor path uses."""
    weight.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = (exp_avg_sq.sqrt() / (bias2 ** 0.5)).add_(eps)
    weight.addcdiv_(exp_avg, denom, value=-lr / bias1)
