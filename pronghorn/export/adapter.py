"""Write a model's LoRA adapter in PEFT format (loads with peft.PeftModel.from_pretrained, vLLM, llama.cpp).

The adapter holds the LoRA matrices and, when ``target_modules`` trained them, the embeddings and LM head as PEFT's
``modules_to_save`` (which PEFT loads; vLLM and llama.cpp's adapter converter refuse them: serve the merged
export then, see the README). Other trained base weights cannot be expressed that way: the export warns and
names them, and the merged export (save_pretrained_merged / GGUF) keeps them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from safetensors.torch import save
from torch import nn

from ..errors import PronghornError
from ..files import atomic_file, check_output_dir
from ..models.adapter_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, base_record, peft_config_dict, peft_state_dict
from ..models.fused_adapter import fuse_adapter
from ..models.lora import is_tied, trained_modules
from ..models.wrapped_text import adapter_to_wrapper

MODEL_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "model.safetensors", "model.safetensors.index.json")


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``adapter_model.safetensors`` then ``adapter_config.json`` into ``path``, each atomically.

    Other files in ``path`` (a tokenizer, metrics) are left alone; an existing adapter or model there is
    only replaced with ``overwrite=True``. An adapter of the default model records its hub id as the base
    (``base_record``), which PEFT's AutoPeftModelForCausalLM and vLLM resolve.
    """
    config = getattr(model, "lora_config", None)
    if config is None:
        raise PronghornError("the model has no LoRA adapter to save; call get_peft_model first")
    path = check_output_dir(path, overwrite, marker_files=MODEL_FILES)
    _warn_trained_base(model)
    base, metadata = base_record(base_model_name_or_path or getattr(model, "name_or_path", None))
    # a family whose checkpoints fuse projections (Phi-3): the parts' adapters on the fused modules PEFT knows
    tensors, targets, ranks, alphas = fuse_adapter(model.config, config, peft_state_dict(model))
    wrapper = getattr(model.config, "wrapper", None)
    if wrapper is not None:  # loaded from an image-text checkpoint: the adapter PEFT loads on that base
        tensors, targets = adapter_to_wrapper(wrapper, tensors, targets)
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    peft_config = peft_config_dict(config, base, tied=is_tied(model))
    peft_config.update(target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas)
    with atomic_file(path / ADAPTER_WEIGHTS) as f:
        f.write(save(tensors, metadata={"format": "pt", **metadata}))
    with atomic_file(path / ADAPTER_CONFIG, "w") as f:
        f.write(json.dumps(peft_config, indent=2) + "\n")
    return path


def _warn_trained_base(model: nn.Module) -> None:
    """Warn when parameters outside the LoRA matrices are trainable: the adapter file cannot carry them."""
    saved = {id(p) for _, p in trained_modules(model)}
    names = [n for n, p in model.named_parameters()
             if p.requires_grad and not n.endswith(("lora_A", "lora_B")) and id(p) not in saved]
    if not names:
        return
    embed = [n for n in names if "embed_tokens" in n or n.startswith("lm_head")]
    what = "the embeddings / LM head" if embed else "base weights"
    warnings.warn(
        f"{what} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) are trainable, but a PEFT adapter "
        "holds only the LoRA matrices and the modules_to_save it was given: those weights are NOT in the adapter "
        "(train embed_tokens / lm_head by naming them in target_modules). Export the merged model (save_pretrained_merged / save_pretrained_gguf) to keep them",
        UserWarning, stacklevel=3,
    )
