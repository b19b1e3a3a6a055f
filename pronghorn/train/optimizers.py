"""The optimizers ``TrainConfig.optim`` names: torch AdamW (fused or foreach) and bitsandbytes' 8-bit AdamW.

Names follow Hugging Face ``TrainingArguments.optim`` / TRL, so recipes carry over: ``adamw_torch``,
``adamw_torch_fused`` (the default: one fused kernel per step on a GPU), ``adamw_8bit`` (also
``adamw_bnb_8bit``; bitsandbytes, CUDA only) and ``paged_adamw_8bit`` / ``paged_adamw_32bit`` (bitsandbytes'
paged variants, whose state can spill to host memory), and for bfloat16 weights (full fine-tuning)
``adamw_bf16_sr`` (fp32 moments, the bf16 weight stochastically rounded), ``adamw_bf16_sr_bf16_moments`` (the
moments bf16 and stochastically rounded too: 6 bytes per weight, as torch's AdamW on bf16) and
``adamw_bf16_master`` (an fp32 master copy) from train/bf16_adamw.py. Anything else is refused with the list.
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch

from ..errors import PronghornError

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
              "adamw_bf16_sr", "adamw_bf16_sr_bf16_moments", "adamw_bf16_master")
_ALIASES = {"adamw": "adamw_torch_fused", "adamw_bnb_8bit": "adamw_8bit", "adamw_torch_8bit": "adamw_8bit"}
_BF16_ROUNDING = {"adamw_bf16_sr": ("stochastic", "fp32"), "adamw_bf16_sr_bf16_moments": ("stochastic", "bf16"),
                  "adamw_bf16_master": ("master", "fp32")}
_BNB_CLASSES = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw_32bit": "PagedAdamW32bit"}


def optimizer_name(name: str) -> str:
    """The canonical name for ``name`` (HF/TRL spellings accepted), or a PronghornError listing the choices."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in OPTIMIZERS:
        raise PronghornError(f"optim {name!r} is not supported; choose one of {list(OPTIMIZERS)} "
                             f"(HF/TRL names: {sorted(_ALIASES)} map onto these)")
    return key


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, betas: tuple[float, float],
                    eps: float, weight_decay: float, device: torch.device, seed: int = 0,
                    first_index: int = 0) -> torch.optim.Optimizer:
    """The optimizer ``name`` for ``params`` living on ``device``; ``seed``: the stochastic rounding's, and
    ``first_index`` the index of the first of ``params`` in that rounding's streams (train/bf16_adamw.py)."""
    name = optimizer_name(name)
    params = list(params)
    kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw_torch":
        return torch.optim.AdamW(params, foreach=device.type == "cuda", **kw)
    if name == "adamw_torch_fused":
        fused = device.type in ("cuda", "cpu")  # torch's fused AdamW kernels exist for these
        return torch.optim.AdamW(params, fused=fused, **kw)
    if name in _BF16_ROUNDING:
        from .bf16_adamw import BF16AdamW

        rounding, moments = _BF16_ROUNDING[name]
        return BF16AdamW(params, rounding=rounding, moments=moments, seed=seed, first_index=first_index, **kw)
    if device.type != "cuda":
        raise PronghornError(f"optim {name!r} runs on a CUDA GPU only (bitsandbytes); on {device.type} use "
                             f"optim='adamw_torch_fused'")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise PronghornError(f"optim {name!r} needs bitsandbytes: `pip install bitsandbytes`, or use "
                             f"optim='adamw_torch_fused'") from None
    cls = getattr(bnb.optim, _BNB_CLASSES[name])
    return (cls if name.startswith("paged_") else _without_per_parameter_syncs(cls))(params, **kw)


@functools.cache
def _without_per_parameter_syncs(cls: type) -> type:
    """bitsandbytes' optimizer ``cls`` whose ``step`` does not wait for the GPU after every parameter.

    bitsandbytes 0.50's ``Optimizer8bit.step`` calls ``torch.cuda.synchronize()`` after each parameter's update.
    Its kernels run in stream order with the rest of the step, so those waits only stall the GPU: 9 per layer
    with the step in the backward (train/step_in_backward.py), where each one drains the backward's queue. This
    step makes the same calls in the same order (state set up on first use, then ``update_step``) without the
    waits. The paged variants keep theirs: paged state is moved asynchronously and needs them. One subclass per
    class (cached): the step in the backward builds an optimizer per parameter."""
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self.init_state(group, p, gindex, pindex)
                self.update_step(group, p, gindex, pindex)
        return loss

    return type(cls.__name__, (cls,), {"step": torch.no_grad()(step), "__doc__": _without_per_parameter_syncs.__doc__})
