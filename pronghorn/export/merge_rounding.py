"""How much of a LoRA fine-tune survives writing the merged weights in a lower precision.

A small fine-tune moves each weight by less than the spacing of bf16 numbers there (1/128 to 1/256 of the weight),
so rounding the merged W + s B A to bf16 can undo much of it: a 10-step gsm8k adapter on SmolLM2 lost about 40%
of its loss improvement that way (issue 19). Before a merged export, ``rounding_effect`` runs the model once on a
probe (64 token ids spread over the vocabulary, so no tokenizer is needed; on SmolLM2 a text probe gives the same
figure, within 1% of it) and, at every adapted projection, on the activations x reaching it, compares in fp32

- the adapter's change to the projection's output:        x (s B A)^T
- the change rounding makes to the merged output:         x (round(W + s B A) - (W + s B A))^T

It returns sqrt(sum |rounding change|^2 / sum |adapter change|^2) over all adapted projections: rounding's effect
as a fraction of the fine-tune's own. ``warn_if_rounding_undoes`` warns above ``ROUNDING_LIMIT`` (10%) and names
float32, which keeps the merge exact. It costs one forward of the probe and one pass over the adapted weights.
A model FSDP manages (rank 0's inside ``train.fsdp_gather.gathered``) is not measured: its forward is a collective.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..models.lora import lora_modules
from .merged import BaseCheckpoint, base_weight

ROUNDING_LIMIT = 0.10
# q_proj, k_proj and v_proj read their attention module's input, and may run fused (kernels.lora_qkv) without
# calling their own forward: their input is taken at the attention module
_QKV = ("q_proj", "k_proj", "v_proj")
PROBE_TOKENS = 64


@torch.no_grad()
def rounding_effect(model: nn.Module, dtype: torch.dtype, base_checkpoint: str | Path | None = None) -> float | None:
    """Rounding's change to the adapted projections' outputs on the probe as a fraction of the adapter's change
    (module docstring); None when the model has no adapter, the adapter changes nothing (B = 0) or FSDP manages
    the model."""
    adapted = dict(lora_modules(model))
    if not adapted or _fsdp_managed(model):
        return None
    reads = {name: name.rsplit(".", 1)[0] if name.endswith(_QKV) else name for name in adapted}
    modules = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    hooks = [modules[name].register_forward_pre_hook(_keep_input(inputs, name)) for name in set(reads.values())]
    training = model.training
    try:
        model.eval()
        ids = (torch.arange(PROBE_TOKENS) * 7919 + 11) % model.config.vocab_size  # 7919: a prime, spreads them
        model(input_ids=ids[None].to(model.device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    ckpt = BaseCheckpoint(base_checkpoint) if base_checkpoint is not None else None
    rounding = adapter = 0.0
    for name, m in adapted.items():
        x = inputs[reads[name]]
        delta = (m.lora_B.float() @ m.lora_A.float()).to(x.device) * m.lora_scaling
        exact = base_weight(name, m, ckpt).to(x.device, torch.float32) + delta
        rounding += float((x @ (exact.to(dtype).float() - exact).T).square().sum())
        adapter += float((x @ delta.T).square().sum())
    return (rounding / adapter) ** 0.5 if adapter > 0 else None


def warn_if_rounding_undoes(model: nn.Module, dtype: torch.dtype,
                            base_checkpoint: str | Path | None = None) -> float | None:
    """``rounding_effect``, with a UserWarning when it is above ``ROUNDING_LIMIT``; returns it."""
    effect = rounding_effect(model, dtype, base_checkpoint)
    if effect is not None and effect > ROUNDING_LIMIT:
        name = str(dtype).removeprefix("torch.")
        warnings.warn(f"writing the merged weights as {name} moves the adapted projections' outputs by "
                      f"{effect:.0%} of the adapter's own change to them (on a probe; warned above "
                      f"{ROUNDING_LIMIT:.0%}): the merged model keeps only part of the fine-tune. Write float32 "
                      "to keep it exactly: dtype=torch.float32 (CLI: --dtype float32), or keep the adapter "
                      "separate (save_method='lora', CLI: --format lora)", UserWarning, stacklevel=3)
    return effect


def _fsdp_managed(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _keep_input(inputs: dict[str, torch.Tensor], name: str):
    def hook(_module, args):
        x = args[0]
        inputs[name] = x.detach().reshape(-1, x.shape[-1]).float()

    return hook
