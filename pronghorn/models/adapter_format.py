"""PEFT's LoRA adapter format: adapter_config.json + adapter_model.safetensors with PEFT key names."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import CheckpointError
from .fused_adapter import split_adapter_tensors
from .lora import LoRAConfig, attach_lora, lora_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names (``base_model.model.<module>.lora_A.weight``)."""
    out = {}
    for name, module in lora_modules(model):
        out[f"{_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach()
        out[f"{_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach()
    return out


def peft_config_dict(config: LoRAConfig, base_model_name_or_path: str | None) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": list(config.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": None,
    }


def read_adapter_config(path: str | Path) -> tuple[LoRAConfig, dict]:
    """(LoRAConfig, raw dict) from an adapter directory, refusing what pronghorn cannot represent exactly."""
    cfg_path = Path(path) / ADAPTER_CONFIG
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path}: not found (not a PEFT adapter directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_pattern"):
        if raw.get(key):
            raise CheckpointError(f"{cfg_path}: field {key!r}={raw[key]!r} is not supported yet")
    if raw.get("fan_in_fan_out"):
        raise CheckpointError(f"{cfg_path}: field 'fan_in_fan_out' is true; only nn.Linear layouts are supported")
    targets = raw.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise CheckpointError(f"{cfg_path}: regex target_modules {targets!r} are not supported; list module names")
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    try:
        config = LoRAConfig(
            r=int(raw["r"]), lora_alpha=float(raw.get("lora_alpha", raw["r"])),
            lora_dropout=float(raw.get("lora_dropout") or 0.0), target_modules=targets,
            use_rslora=bool(raw.get("use_rslora", False)), bias=raw.get("bias", "none"), layers_to_transform=layers,
        )
    except KeyError as e:
        raise CheckpointError(f"{cfg_path}: required field {e.args[0]!r} is missing") from None
    except Exception as e:  # LoRAConfig validation
        raise CheckpointError(f"{cfg_path}: {e}") from None
    return config, raw


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Attach the adapter stored at ``path`` (PEFT format) to ``model``; every tensor must match a module."""
    path = Path(path)
    config, _ = read_adapter_config(path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise CheckpointError(f"{path / 'adapter_model.bin'}: pickle adapters are not loaded (unsafe); "
                                  "re-save it as safetensors")
        raise CheckpointError(f"{weights}: not found")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: cannot be read ({e})") from None
    attach_lora(model, config)
    expected = peft_state_dict(model)
    tensors = split_adapter_tensors(model.config, {_strip_adapter_name(k): v for k, v in tensors.items()})
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{weights}: tensors do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, module in lora_modules(model):
            for part in ("lora_A", "lora_B"):
                src = tensors[f"{_PREFIX}{name}.{part}.weight"]
                dst = getattr(module, part)
                if src.shape != dst.shape:
                    raise CheckpointError(f"{weights}: {name}.{part} has shape {tuple(src.shape)}, "
                                          f"the model needs {tuple(dst.shape)}")
                dst.copy_(src.to(dst.dtype))
    return model


def _strip_adapter_name(key: str) -> str:
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
