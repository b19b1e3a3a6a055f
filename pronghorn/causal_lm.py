"""The model class users hold: the decoder plus the notebook methods (generate, save_pretrained, ...)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from .errors import PronghornError
from .export.adapter import save_adapter
from .export.merged import save_merged
from .infer.generate import generate as _generate
from .models.decoder import DecoderForCausalLM
from .models.hf_outputs import backbone_output
from .models.lora import set_lora_enabled, trainable_parameters


_GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "eos_token_id", "pad_token_id", "stop_strings")


class GenerationSettings(dict):
    """generation_config.json as a dict whose keys also read and write as attributes (a missing key reads as
    None), the part of transformers' GenerationConfig that trainers use (``generation_config.pad_token_id = 0``)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self.get(name)

    def __setattr__(self, name: str, value) -> None:
        self[name] = value


class _Backbone:
    """``model.base_model`` as transformers models have it: the decoder stack called with keyword arguments,
    returning ``.last_hidden_state`` (TRL's fused LM head runs it, then applies ``lm_head.weight`` itself).
    Not an ``nn.Module``, so it registers no parameters twice."""

    def __init__(self, lm: "PronghornForCausalLM"):
        self._lm = lm

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, **_unused) -> BaseModelOutputWithPast:
        hidden = self._lm.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds)
        return backbone_output(hidden, past_key_values)


class PronghornForCausalLM(DecoderForCausalLM):
    name_or_path: str | None = None
    max_seq_length: int = 2048

    # --- what HF Trainer / TRL's SFTTrainer expect of a transformers model, beyond DecoderForCausalLM's ---
    supports_gradient_checkpointing = True
    _keys_to_ignore_on_save = None

    @property
    def generation_config(self) -> GenerationSettings:
        return self.__dict__.setdefault("_generation_settings", GenerationSettings())

    @generation_config.setter
    def generation_config(self, value) -> None:
        self.__dict__["_generation_settings"] = GenerationSettings(value or {})

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers=None,
                                        offload: bool = False) -> None:
        """transformers 5's name for gradient checkpointing (HF Trainer calls it); every layer is checkpointed."""
        self.gradient_checkpointing_enable()

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """transformers' PreTrainedModel property (TRL reads it)."""
        return bool(self.model.gradient_checkpointing)

    @property
    def base_model(self) -> _Backbone:
        return _Backbone(self)

    def add_model_tags(self, tags) -> None:
        """Tags for a model card (TRL adds its own); kept, not used."""
        self.__dict__.setdefault("model_tags", [])
        self.model_tags.extend(t for t in ([tags] if isinstance(tags, str) else tags) if t not in self.model_tags)

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        """transformers-style generation (max_new_tokens, do_sample, temperature, top_p, top_k, min_p,
        repetition_penalty, streamer, stop_strings + tokenizer; or these in a ``generation_config``, keyword
        arguments winning); returns prompt + new token ids. On CUDA the
        decode step is replayed as a CUDA graph over a static KV cache (``decode_mode``: see infer.generate)."""
        gen = getattr(self, "generation_config", None) or {}
        settings = kwargs.pop("generation_config", None)
        if settings is not None:  # transformers' GenerationConfig (TRL's GRPOTrainer passes one): its sampling
            for key in _GENERATION_KEYS:  # settings, where the call does not name them itself
                value = getattr(settings, key, None)
                if value is not None and kwargs.get(key) is None:
                    kwargs[key] = value
        if kwargs.get("eos_token_id") is None:
            kwargs["eos_token_id"] = gen.get("eos_token_id", self.config.eos_token_id)
        if kwargs.get("pad_token_id") is None:
            kwargs["pad_token_id"] = gen.get("pad_token_id", self.config.pad_token_id)
        return _generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def save_pretrained(self, save_directory: str | Path, overwrite: bool = False,
                        max_shard_size: int | str | None = None, is_main_process: bool = True,
                        **hf_options) -> Path:
        """With an adapter: the PEFT adapter (adapter_config.json + adapter_model.safetensors).
        Without one: the full model as a Hugging Face checkpoint, sharded by ``max_shard_size`` (5GB).
        ``is_main_process=False`` (the other ranks of a distributed run) writes nothing, as in transformers.
        Other transformers keywords only where they ask for what pronghorn does (``safe_serialization=True``)."""
        from .export.save import check_unused_options

        check_unused_options("save_pretrained", hf_options, "overwrite, max_shard_size (no adapter), is_main_process")
        if not is_main_process:
            return Path(save_directory)
        if self.lora_config is not None:
            if max_shard_size is not None:
                raise PronghornError("save_pretrained: max_shard_size applies to a full model; the LoRA adapter is "
                                     "one file (for a merged checkpoint: save_pretrained_merged)")
            return save_adapter(self, save_directory, self.name_or_path, overwrite=overwrite)
        return save_merged(self, save_directory, tokenizer=None, overwrite=overwrite,
                           max_shard_size=max_shard_size or "5GB")

    def save_pretrained_merged(self, save_directory: str | Path, tokenizer=None, save_method: str = "merged_16bit",
                               overwrite: bool = False, max_shard_size: int | str | None = None,
                               dtype: torch.dtype | str | None = None, base_checkpoint: str | Path | None = None,
                               is_main_process: bool = True, **unsloth_options) -> Path:
        """``merged_16bit``: base + adapter folded into one sharded HF checkpoint, bf16 unless ``dtype`` (e.g.
        torch.float32: bf16 rounding can undo part of a small fine-tune, and a warning says when it does);
        ``lora``: the adapter only; ``merged_4bit_forced``: merged then re-quantized to NF4 (bnb-4bit). QLoRA models
        merge into the dequantized base unless ``base_checkpoint`` names the original 16-bit checkpoint.
        ``is_main_process=False`` writes nothing. An option the save_method does not use is an error."""
        from .export.save import check_unused_options, save_pretrained_merged

        check_unused_options("save_pretrained_merged", unsloth_options, "tokenizer, save_method, overwrite, "
                             "max_shard_size, dtype, base_checkpoint, is_main_process")
        if not is_main_process:
            return Path(save_directory)
        return save_pretrained_merged(self, save_directory, tokenizer, save_method, overwrite=overwrite,
                                      max_shard_size=max_shard_size, dtype=dtype, base_checkpoint=base_checkpoint)

    def save_pretrained_gguf(self, save_directory: str | Path, tokenizer=None,
                             quantization_method: str | list[str] = "f16", overwrite: bool = False,
                             base_checkpoint: str | Path | None = None, is_main_process: bool = True,
                             **unsloth_options) -> list[Path]:
        """GGUF file(s) ``model.<METHOD>.gguf`` (f16, bf16, q8_0, q4_k_m, ...; a list gives one file each) and an
        Ollama Modelfile, adapter merged, written without llama.cpp. ``is_main_process=False`` writes nothing."""
        from .export.save import check_unused_options, save_pretrained_gguf

        check_unused_options("save_pretrained_gguf", unsloth_options, "tokenizer, quantization_method, overwrite, "
                             "base_checkpoint, is_main_process")
        if not is_main_process:
            return []
        return save_pretrained_gguf(self, save_directory, tokenizer, quantization_method, overwrite=overwrite,
                                    base_checkpoint=base_checkpoint)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model (adapters switched off) inside the block."""
        set_lora_enabled(self, False)
        try:
            yield self
        finally:
            set_lora_enabled(self, True)

    def as_reference(self):
        """This model with its adapters disabled, as a separate module that owns no weights: the no-copy
        reference for TRL's ``DPOTrainer(model, ref_model=model.as_reference(), ...)`` / ``KTOTrainer``
        (see pronghorn/reference_view.py for why ``ref_model=None`` is not enough there)."""
        from .reference_view import ReferenceView

        return ReferenceView(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = trainable_parameters(self)
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
