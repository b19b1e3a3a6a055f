"""pronghorn and transformers + PEFT as twin LoRA models: one checkpoint dir loaded by both in fp32, and the same
LoRA weights (B non-zero, so the adapted model differs from the base), to compare them under one trainer."""

from __future__ import annotations

import peft
import torch
import transformers

from pronghorn import FastLanguageModel
from pronghorn.models.lora import lora_modules

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_config() -> peft.LoraConfig:
    """The LoRA both twins carry (r=4, alpha=8, no dropout, every projection)."""
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


def lora_twins(checkpoint_dir, seed: int = 5, scale: float = 0.1):
    """(pronghorn model with LoRA, B drawn from ``seed``; the same checkpoint as a plain transformers model).
    Hand the second to a TRL trainer with ``peft_config=peft_config()``, then ``copy_lora`` into ``trainer.model``:
    TRL then takes the adapters-disabled base as the reference, as ``ours.as_reference()`` is."""
    ours, _ = FastLanguageModel.from_pretrained(str(checkpoint_dir), dtype=torch.float32)
    ours = FastLanguageModel.get_peft_model(ours, r=4, lora_alpha=8, target_modules=TARGETS,
                                            use_gradient_checkpointing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(ours):
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * scale)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32,
                                                           attn_implementation="sdpa")
    return ours, hf


def lora_weights(ours, peft_model) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, pronghorn's tensor, PEFT's tensor) for every LoRA A and B."""
    out = []
    for name, module in lora_modules(ours):
        twin = peft_model.get_submodule("base_model.model." + name)
        for part in ("lora_A", "lora_B"):
            out.append((f"{name}.{part}", getattr(module, part), getattr(twin, part)["default"].weight))
    assert len(out) == 2 * len(TARGETS) * ours.config.num_hidden_layers
    return out


@torch.no_grad()
def copy_lora(ours, peft_model) -> None:
    """Give the PEFT model pronghorn's LoRA weights."""
    for _, got, ref in lora_weights(ours, peft_model):
        ref.copy_(got)
