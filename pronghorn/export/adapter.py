"""Write a model's LoRA adapter in PEFT format (loads with peft.PeftModel.from_pretrained, vLLM, llama.cpp).

The adapter holds only the LoRA matrices (``modules_to_save`` is always empty), which is what vLLM serves. A
model whose embeddings, LM head or other base weights were trained as well cannot be expressed that way: the
export warns and names them, and the merged export (save_pretrained_merged / GGUF) keeps them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from safetensors.torch import save
from torch import nn

from ..errors import PronghornError
from ..files import atomic_file, check_output_dir
from ..models.adapter_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_config_dict, peft_state_dict
from ..models.fused_adapter import fuse_adapter

MODEL_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "model.safetensors", "model.safetensors.index.json")


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``adapter_model.safetensors`` then ``adapter_config.json`` into ``path``, each atomically.

    Other files in ``path`` (a tokenizer, metrics) are left alone; an existing adapter or model there is
    only replaced with ``overwrite=True``.
    """
    config = getattr(model, "lora_config", None)
    if config is None:
        raise PronghornError("the model has no LoRA adapter to save; call get_peft_model first")
    path = check_output_dir(path, overwrite, marker_files=MODEL_FILES)
    _warn_trained_base(model)
    base = base_model_name_or_path or getattr(model, "name_or_path", None)
    # a family whose checkpoints fuse projections (Phi-3): the parts' adapters on the fused modules PEFT knows
    tensors, targets, ranks, alphas = fuse_adapter(model.config, config, peft_state_dict(model))
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    peft_config = peft_config_dict(config, base)
    peft_config.update(target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas)
    with atomic_file(path / ADAPTER_WEIGHTS) as f:
        f.write(save(tensors, metadata={"format": "pt"}))
    with atomic_file(path / ADAPTER_CONFIG, "w") as f:
        f.write(json.dumps(peft_config, indent=2) + "\n")
    return path


def _warn_trained_base(model: nn.Module) -> None:
    """Warn when parameters outside the LoRA matrices are trainable: the adapter file cannot carry them."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and not n.endswith(("lora_A", "lora_B"))]
    if not names:
        return
    embed = [n for n in names if "embed_tokens" in n or n.startswith("lm_head")]
    what = "the embeddings / LM head" if embed else "base weights"
    warnings.warn(
        f"{what} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) are trainable, but a PEFT adapter "
        "for vLLM holds only the LoRA matrices (no modules_to_save): those weights are NOT in the adapter. "
        "Export the merged model (save_pretrained_merged / save_pretrained_gguf) to keep them",
        UserWarning, stacklevel=3,
    )
