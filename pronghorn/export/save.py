"""The notebook save methods (Unsloth's names): ``save_pretrained_merged`` and ``save_pretrained_gguf``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import PronghornError
from ..files import atomic_dir, check_output_dir
from .adapter import MODEL_FILES, save_adapter
from .gguf_writer import save_gguf
from .merged import _chmod_like_mkdir, generation_config, parse_size, save_merged

SAVE_METHODS = ("merged_16bit", "lora", "merged_4bit_forced")


def _need_tokenizer(tokenizer, what: str) -> None:
    if tokenizer is None:
        raise PronghornError(f"{what} needs the tokenizer, so the export is usable on its own: pass the tokenizer "
                             "from from_pretrained, e.g. model.save_pretrained_merged(dir, tokenizer)")


def save_pretrained_merged(model: nn.Module, save_directory: str | Path, tokenizer=None,
                           save_method: str = "merged_16bit", overwrite: bool = False,
                           max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None,
                           base_checkpoint: str | Path | None = None) -> Path:
    """``merged_16bit``: base + adapter folded into one HF checkpoint (bf16 unless ``dtype``), sharded by size;
    ``lora``: the PEFT adapter (+ tokenizer); ``merged_4bit_forced``: the merged weights re-quantized to NF4 as a
    bitsandbytes "-bnb-4bit" checkpoint (lossy: prefer merged_16bit for serving)."""
    if save_method not in SAVE_METHODS:
        raise PronghornError(f"unknown save_method {save_method!r}; choose among {', '.join(SAVE_METHODS)}")
    if save_method == "lora":
        check_output_dir(save_directory, overwrite, marker_files=MODEL_FILES)
        path = save_adapter(model, save_directory, getattr(model, "name_or_path", None), overwrite=overwrite)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
        return path
    _need_tokenizer(tokenizer, f"save_method={save_method!r}")
    if save_method == "merged_16bit":
        return save_merged(model, save_directory, tokenizer, dtype=dtype or torch.bfloat16, overwrite=overwrite,
                           max_shard_size=max_shard_size, base_checkpoint=base_checkpoint)
    return _save_merged_4bit(model, save_directory, tokenizer, dtype or torch.bfloat16, overwrite)


def _save_merged_4bit(model: nn.Module, path: str | Path, tokenizer, dtype: torch.dtype, overwrite: bool) -> Path:
    from ..models.quantized_checkpoint import write_bnb_4bit_files

    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_bnb_4bit_files(model, tmp, dtype)
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(model, tokenizer), indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        _chmod_like_mkdir(tmp)
    return Path(path)


def save_pretrained_gguf(model: nn.Module, save_directory: str | Path, tokenizer=None,
                         quantization_method: str | list[str] = "f16", overwrite: bool = False,
                         base_checkpoint: str | Path | None = None) -> list[Path]:
    """One ``model.<METHOD>.gguf`` per method (f32, f16, bf16, q8_0, q5_0, q4_0, q6_k, q4_k, q4_k_m) and an Ollama
    Modelfile, adapter merged; written by pronghorn (no llama.cpp build)."""
    _need_tokenizer(tokenizer, "save_pretrained_gguf")
    return save_gguf(model, save_directory, tokenizer, quantization_method, overwrite=overwrite,
                     base_checkpoint=base_checkpoint)


__all__ = ["SAVE_METHODS", "parse_size", "save_pretrained_gguf", "save_pretrained_merged"]
