"""Write a model (with any LoRA adapter folded in) as a Hugging Face checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..files import atomic_dir
from ..models.linear import Linear

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Base weights with W + s * B A for every adapter, computed in fp32; the model is not modified."""
    out = {}
    lora = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, Linear) and m.has_lora}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if name.endswith(("lora_A", "lora_B")) or (tied and name == "lm_head.weight"):
            continue
        t = tensor.detach()
        if name in lora:
            m = lora[name]
            t = t.float() + (m.lora_B.float() @ m.lora_A.float()).to(t.device) * m.lora_scaling
        out[name] = t.to(dtype or tensor.dtype).contiguous().cpu()
    return out


def save_merged(model: nn.Module, path: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
                overwrite: bool = False) -> Path:
    """config.json + model.safetensors (+ generation_config.json, tokenizer files) written atomically."""
    sd = merged_state_dict(model, dtype)
    dtype = dtype or next(iter(sd.values())).dtype
    config = dict(model.config.to_hf_dict())
    config.pop("quantization_config", None)
    config["torch_dtype"] = _DTYPE_NAMES.get(dtype, "float32")
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen:
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(path)
