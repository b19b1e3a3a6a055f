"""Full fine-tuning on one device (``full_finetuning=True``, ``--full-finetuning``): every weight trains.

No adapter is attached; every parameter of the model trains (a tied table is one parameter, trained once) in the
weights' own dtype: bfloat16 on a GPU, float32 on the CPU unless ``dtype`` says otherwise. What makes it affordable:

- the optimizer (train/optimizers.py): ``adamw_8bit`` (bitsandbytes, 8-bit moments) or ``adamw_bf16_sr`` (fp32
  moments, stochastically rounded bf16 weights: train/bf16_adamw.py). With bf16 weights in one process the default
  ``optim`` (``adamw_torch_fused``, whose moments would be bf16 and whose rounding to nearest loses small updates)
  means ``adamw_bf16_sr``; ``adamw_torch`` asks for torch's AdamW as it is (FSDP: the setting as it is);
- ``optimizer_in_backward`` (train/step_in_backward.py): each weight steps as soon as its gradient is complete,
  so no full set of gradients exists;
- recompute and the memory budget (models/memory_plan.py), as for LoRA: the plan counts a gradient and the
  optimizer's state for every weight (:func:`optimizer_footprint`).

The trainer saves the trained model as a Hugging Face checkpoint (config.json + model.safetensors) and its
``checkpoint-N`` directories as sharded safetensors with the optimizer state and RNG (train/sharded_checkpoint.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PronghornError
from ..models.memory_plan import OptimizerFootprint
from .step_in_backward import check_step_in_backward

DEFAULT_OPTIM = "adamw_torch_fused"
# bytes of optimizer state per trained element
_STATE_BYTES = {"adamw_bf16_sr": 8, "adamw_bf16_sr_bf16_moments": 4, "adamw_bf16_master": 12, "adamw_8bit": 2,
                "paged_adamw_8bit": 2}


def check_settings(cfg) -> None:
    """What full fine-tuning and the step in the backward cannot combine with, refused when the config is built."""
    if cfg.optimizer_in_backward:
        check_step_in_backward(cfg.gradient_accumulation_steps, cfg.max_grad_norm)
    if cfg.full_finetuning and cfg.load_in_4bit:
        raise PronghornError("full_finetuning trains every weight in 16 or 32 bits; it cannot be combined with "
                             "load_in_4bit (QLoRA) (CLI: drop --load-in-4bit or --full-finetuning)")
    if cfg.full_finetuning and (cfg.method == "kto" or (cfg.method == "dpo" and cfg.loss_type != "simpo")):
        raise PronghornError(f"full_finetuning with method={cfg.method!r} needs a reference model, and full "
                             "fine-tuning keeps no frozen copy of the weights (LoRA's is the base with the adapters "
                             "off); use a reference-free loss (method='orpo', or loss_type='simpo') or LoRA")


def make_full_finetuning(model: nn.Module) -> nn.Module:
    """Every parameter of ``model`` trains (the hook that replaces ``attach_lora`` when ``full_finetuning``)."""
    if getattr(model, "lora_config", None) is not None:
        raise PronghornError("full_finetuning: this model has LoRA adapters attached; full fine-tuning trains the "
                             "model's own weights (load it again without get_peft_model)")
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            raise PronghornError(f"full_finetuning: {name} is stored quantized ({p.dtype}); load the model in 16 "
                                 "or 32 bits (load_in_4bit=False)")
        p.requires_grad_(True)
    table = model.get_input_embeddings().weight
    if table.device != model.device:
        raise PronghornError("full_finetuning trains the embedding table; offload_embedding keeps it frozen on the "
                             "host (pass offload_embedding=False)")
    model.__dict__["full_finetuning"] = True  # get_peft_model then attaches nothing (as Unsloth)
    return model


def resolve_optim(name: str, params: list[torch.Tensor], world_size: int = 1) -> str:
    """The optimizer full fine-tuning of ``params`` uses for the setting ``name`` (module doc); under torchrun
    (FSDP shards) the setting as it is."""
    if name == DEFAULT_OPTIM and world_size == 1 and any(p.dtype == torch.bfloat16 for p in params):
        return "adamw_bf16_sr"
    return name


def optimizer_footprint(optim: str, in_backward: bool, full_finetuning: bool = False) -> OptimizerFootprint:
    """What the memory plan counts for the trained weights under ``optim`` (torch AdamW: two moments), and, for
    full fine-tuning, the leaner settings its "does not fit" error names (load_in_4bit does not apply there)."""
    state = _STATE_BYTES.get(optim)
    advice = _leaner_settings(8 if state is None else state, in_backward) if full_finetuning else ""
    return OptimizerFootprint(state_bytes=state, grads_in_backward=in_backward, advice=advice)


def _leaner_settings(state_bytes: float, in_backward: bool) -> str:
    ways = []
    if state_bytes > 4:
        ways.append(f"optim='adamw_bf16_sr_bf16_moments' (4 bytes of optimizer state per weight, not {state_bytes:g})"
                    " or 'adamw_8bit' (2; bitsandbytes, CUDA)")
    elif state_bytes > 2:
        ways.append("optim='adamw_8bit' (2 bytes of optimizer state per weight; bitsandbytes, CUDA)")
    if not in_backward:
        ways.append("optimizer_in_backward=True (gradients applied and freed layer by layer)")
    return ", or ".join(ways) or "LoRA instead of full fine-tuning (get_peft_model)"


def make_trainable(model: nn.Module, cfg) -> str:
    """What ``cfg`` trains of ``model``: every weight (``full_finetuning``) or LoRA adapters, attached here.
    Returns the words for the run's summary line. The one call ``pronghorn.train`` makes for either."""
    if cfg.full_finetuning:
        make_full_finetuning(model)
        return "full fine-tuning"
    from ..models.lora import LoRAConfig, attach_lora

    attach_lora(model, LoRAConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                  target_modules=cfg.target_modules, use_rslora=cfg.use_rslora), seed=cfg.seed)
    return f"LoRA r={cfg.r} on {len(cfg.target_modules)} module kinds"
