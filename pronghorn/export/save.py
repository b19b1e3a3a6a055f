"""The notebook save methods (Unsloth's names): ``save_pretrained_merged`` and ``save_pretrained_gguf``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import PronghornError
from ..files import atomic_dir, check_output_dir, chmod_like_mkdir
from .adapter import MODEL_FILES, save_adapter
from .gguf_writer import save_gguf
from .merge_rounding import warn_if_rounding_undoes
from .merged import generation_config, parse_size, save_merged

SAVE_METHODS = ("merged_16bit", "lora", "merged_4bit_forced")
MERGED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# the options of each save_method beyond the directory, tokenizer and overwrite
_OPTIONS = {"merged_16bit": ("max_shard_size", "dtype", "base_checkpoint"), "lora": (),
            "merged_4bit_forced": ("dtype",)}
# keywords of transformers' / Unsloth's save methods that pronghorn has no use for, at the value that asks for what
# pronghorn does anyway (safetensors, the PEFT adapter format, no upload)
_AS_PRONGHORN_DOES = {"safe_serialization": True, "save_peft_format": True, "push_to_hub": False}


def merged_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The dtype of merged weights: torch.bfloat16, torch.float16 or torch.float32, or its name (CLI --dtype)."""
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in MERGED_DTYPES:
        return MERGED_DTYPES[dtype.removeprefix("torch.")]
    if dtype in MERGED_DTYPES.values():
        return dtype
    raise PronghornError(f"dtype {dtype!r} is not a dtype for merged weights; choose among "
                         f"{', '.join(MERGED_DTYPES)} (torch.float32 keeps a small fine-tune exactly)")


def check_unused_options(method: str, options: dict, own: str) -> None:
    """Refuse, naming them, the keywords ``method`` received beyond its own (``own``, listed in the error): only
    transformers' and Unsloth's keywords that ask for what pronghorn does anyway (``safe_serialization=True``,
    ``save_peft_format=True``, ``push_to_hub=False``) or are None pass."""
    bad = {k: v for k, v in options.items()
           if v is not None and not (k in _AS_PRONGHORN_DOES and v == _AS_PRONGHORN_DOES[k])}
    if bad:
        given = ", ".join(f"{k}={v!r}" for k, v in bad.items())
        raise PronghornError(f"{method}: unsupported {given}; its options are {own} (pronghorn writes safetensors "
                             "locally; it does not upload)")


def _need_tokenizer(tokenizer, what: str) -> None:
    if tokenizer is None:
        raise PronghornError(f"{what} needs the tokenizer, so the export is usable on its own: pass the tokenizer "
                             "from from_pretrained, e.g. model.save_pretrained_merged(dir, tokenizer)")


def save_pretrained_merged(model: nn.Module, save_directory: str | Path, tokenizer=None,
                           save_method: str = "merged_16bit", overwrite: bool = False,
                           max_shard_size: int | str | None = None, dtype: torch.dtype | str | None = None,
                           base_checkpoint: str | Path | None = None) -> Path:
    """``merged_16bit``: base + adapter folded into one HF checkpoint, sharded by ``max_shard_size`` (5GB), in
    ``dtype`` (bf16 unless given; torch.float32 keeps a small fine-tune that bf16 rounding would partly undo: a
    warning says when it would, see export/merge_rounding.py);
    ``lora``: the PEFT adapter (+ tokenizer); ``merged_4bit_forced``: the merged weights re-quantized to NF4 as a
    bitsandbytes "-bnb-4bit" checkpoint (lossy: prefer merged_16bit for serving), other tensors in ``dtype``.
    An option the save_method does not use is an error, not ignored."""
    if save_method not in SAVE_METHODS:
        raise PronghornError(f"unknown save_method {save_method!r}; choose among {', '.join(SAVE_METHODS)}")
    given = dict(max_shard_size=max_shard_size, dtype=dtype, base_checkpoint=base_checkpoint)
    unused = [k for k, v in given.items() if v is not None and k not in _OPTIONS[save_method]]
    if unused:
        uses = ", ".join(_OPTIONS[save_method]) or "none of them"
        raise PronghornError(f"save_method={save_method!r} does not use {', '.join(unused)} (it uses {uses})")
    dtype = merged_dtype(dtype) if dtype is not None else torch.bfloat16
    if max_shard_size is not None:
        parse_size(max_shard_size)
    if save_method == "lora":
        check_output_dir(save_directory, overwrite, marker_files=MODEL_FILES)
        path = save_adapter(model, save_directory, getattr(model, "name_or_path", None), overwrite=overwrite)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
        return path
    _need_tokenizer(tokenizer, f"save_method={save_method!r}")
    if save_method == "merged_16bit":
        check_output_dir(save_directory, overwrite)  # before the rounding check's forward
        warn_if_rounding_undoes(model, dtype, base_checkpoint)
        return save_merged(model, save_directory, tokenizer, dtype=dtype, overwrite=overwrite,
                           max_shard_size=max_shard_size or "5GB", base_checkpoint=base_checkpoint)
    return _save_merged_4bit(model, save_directory, tokenizer, dtype, overwrite)


def _save_merged_4bit(model: nn.Module, path: str | Path, tokenizer, dtype: torch.dtype, overwrite: bool) -> Path:
    from ..models.quantized_checkpoint import write_bnb_4bit_files

    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_bnb_4bit_files(model, tmp, dtype)
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(model, tokenizer), indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        chmod_like_mkdir(tmp)
    return Path(path)


def save_pretrained_gguf(model: nn.Module, save_directory: str | Path, tokenizer=None,
                         quantization_method: str | list[str] = "f16", overwrite: bool = False,
                         base_checkpoint: str | Path | None = None) -> list[Path]:
    """One ``model.<METHOD>.gguf`` per method (f32, f16, bf16, q8_0, q5_0, q4_0, q6_k, q4_k, q4_k_m) and an Ollama
    Modelfile, adapter merged; written by pronghorn (no llama.cpp build)."""
    _need_tokenizer(tokenizer, "save_pretrained_gguf")
    return save_gguf(model, save_directory, tokenizer, quantization_method, overwrite=overwrite,
                     base_checkpoint=base_checkpoint)


__all__ = ["MERGED_DTYPES", "SAVE_METHODS", "check_unused_options", "merged_dtype", "parse_size",
           "save_pretrained_gguf", "save_pretrained_merged"]
