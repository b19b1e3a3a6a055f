"""How much of a LoRA fine-tune survives writing the merged weights in a lower precision.

A small fine-tune moves each weight by less than the spacing of bf16 numbers there (1/128 to 1/256 of the weight),
so rounding the merged W + s B A to bf16 can undo much of it: a 10-step gsm8k adapter on SmolLM2 lost about 40% of
its loss improvement that way. Before a merged export, ``rounding_effect`` runs the model once on a short probe
text and, at every adapted projection, on the activations x reaching it, compares in fp32

- the adapter's change to the projection's output:        x (s B A)^T
- the change rounding makes to the merged output:         x (round(W + s B A) - (W + s B A))^T

It returns sqrt(sum |rounding change|^2 / sum |adapter change|^2) over all adapted projections: rounding's effect
as a fraction of the fine-tune's own. ``warn_if_rounding_undoes`` warns above ``ROUNDING_LIMIT`` (10%) and names
float32, which keeps the merge exact. It costs one forward of the probe and one pass over the adapted weights.
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
PROBE = ("Question: A baker makes 24 rolls and sells 3 of them every hour. How many hours do the rolls last?\n"
         "Answer: 24 / 3 = 8, so the rolls last 8 hours.\n"
         "The river runs past the old mill, and in spring the water rises over the stones.")


@torch.no_grad()
def rounding_effect(model: nn.Module, tokenizer, dtype: torch.dtype,
                    base_checkpoint: str | Path | None = None) -> float | None:
    """Rounding's change to the adapted projections' outputs on ``PROBE`` as a fraction of the adapter's change
    (module docstring); None when the model has no adapter or the adapter changes nothing (B = 0)."""
    adapted = dict(lora_modules(model))
    if not adapted:
        return None
    reads = {name: name.rsplit(".", 1)[0] if name.endswith(_QKV) else name for name in adapted}
    modules = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    hooks = [modules[name].register_forward_pre_hook(_keep_input(inputs, name)) for name in set(reads.values())]
    training = model.training
    try:
        model.eval()
        ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
        model(input_ids=ids.to(model.device))
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


def warn_if_rounding_undoes(model: nn.Module, tokenizer, dtype: torch.dtype,
                            base_checkpoint: str | Path | None = None) -> float | None:
    """``rounding_effect``, with a UserWarning when it is above ``ROUNDING_LIMIT``; returns it."""
    effect = rounding_effect(model, tokenizer, dtype, base_checkpoint)
    if effect is not None and effect > ROUNDING_LIMIT:
        name = str(dtype).removeprefix("torch.")
        warnings.warn(f"writing the merged weights as {name} moves the adapted projections' outputs by "
                      f"{effect:.0%} of the adapter's own change to them (on a probe text; warned above "
                      f"{ROUNDING_LIMIT:.0%}): the merged model keeps only part of the fine-tune. Write float32 "
                      "to keep it exactly: dtype=torch.float32 (CLI: --dtype float32), or keep the adapter "
                      "separate (save_method='lora', CLI: --format lora)", UserWarning, stacklevel=3)
    return effect


def _keep_input(inputs: dict[str, torch.Tensor], name: str):
    def hook(_module, args):
        x = args[0]
        inputs[name] = x.detach().reshape(-1, x.shape[-1]).float()

    return hook
