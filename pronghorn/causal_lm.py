"""The model class users hold: the decoder plus the notebook methods (generate, save_pretrained, ...)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .export.adapter import save_adapter
from .export.merged import save_merged
from .infer.generate import generate as _generate
from .models.decoder import DecoderForCausalLM
from .models.lora import set_lora_enabled, trainable_parameters


class PronghornForCausalLM(DecoderForCausalLM):
    name_or_path: str | None = None
    max_seq_length: int = 2048

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        """transformers-style generation (max_new_tokens, do_sample, temperature, top_p, top_k, min_p,
        repetition_penalty, streamer, stop_strings + tokenizer); returns prompt + new token ids."""
        gen = getattr(self, "generation_config", None) or {}
        if kwargs.get("eos_token_id") is None:
            kwargs["eos_token_id"] = gen.get("eos_token_id", self.config.eos_token_id)
        if kwargs.get("pad_token_id") is None:
            kwargs["pad_token_id"] = gen.get("pad_token_id", self.config.pad_token_id)
        return _generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def save_pretrained(self, save_directory: str | Path, overwrite: bool = False, **_ignored) -> Path:
        """With an adapter: the PEFT adapter (adapter_config.json + adapter_model.safetensors).
        Without one: the full model as a Hugging Face checkpoint."""
        if self.lora_config is not None:
            return save_adapter(self, save_directory, self.name_or_path, overwrite=overwrite)
        return save_merged(self, save_directory, tokenizer=None, overwrite=overwrite)

    def save_pretrained_merged(self, save_directory: str | Path, tokenizer=None, save_method: str = "merged_16bit",
                               overwrite: bool = False, **_ignored) -> Path:
        """``merged_16bit``: base + adapter folded into one HF checkpoint (bf16); ``lora``: the adapter only."""
        if save_method == "lora":
            path = save_adapter(self, save_directory, self.name_or_path, overwrite=overwrite)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(path))
            return path
        if save_method != "merged_16bit":
            raise NotImplementedError(f"save_method={save_method!r} is not available yet (merged_16bit, lora)")
        return save_merged(self, save_directory, tokenizer, dtype=torch.bfloat16, overwrite=overwrite)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model (adapters switched off) inside the block."""
        set_lora_enabled(self, False)
        try:
            yield self
        finally:
            set_lora_enabled(self, True)

    def print_trainable_parameters(self) -> None:
        trainable, total = trainable_parameters(self)
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
