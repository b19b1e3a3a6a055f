"""Attaching, configuring and merging LoRA adapters on the decoder's projection layers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..errors import PronghornError
from .families import FAMILIES
from .linear import Linear

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# a fused checkpoint module's name (Phi-3's qkv_proj, gate_up_proj) -> the decoder's projections it holds
FUSED_TARGETS = {f.fused.split(".")[-1]: tuple(p.split(".")[-1] for p in f.parts)
                 for spec in FAMILIES.values() for f in spec.fusions}


@dataclass
class LoRAConfig:
    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    use_rslora: bool = False
    bias: str = "none"
    layers_to_transform: list[int] | None = None

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = list(ALL_TARGETS) if self.target_modules == "all-linear" else [self.target_modules]
        names = [t.split(".")[-1] for t in self.target_modules]
        names = [part for n in names for part in FUSED_TARGETS.get(n, (n,))]
        unknown = sorted(set(names) - set(ALL_TARGETS))
        if unknown:
            raise PronghornError(f"target_modules {unknown} not supported; choose among {list(ALL_TARGETS)} "
                                 f"(or the fused {list(FUSED_TARGETS)}, meaning their parts)")
        self.target_modules = [t for t in ALL_TARGETS if t in names]
        if self.r <= 0:
            raise PronghornError(f"LoRA rank r must be positive, got {self.r}")
        if self.bias != "none":
            raise PronghornError(f"bias={self.bias!r} is not supported; only bias='none' (PEFT's default)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise PronghornError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        return asdict(self)


def lora_targets(model: nn.Module, targets: list[str], layers: list[int] | None = None) -> Iterator[tuple[str, Linear]]:
    """(name, Linear) for every projection whose last name part is in ``targets``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name.split(".")[-1] in targets:
            if layers is not None and _layer_index(name) not in layers:
                continue
            yield name, module


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def attach_lora(model: nn.Module, config: LoRAConfig, seed: int = 3407) -> nn.Module:
    """Freeze every base parameter and add fresh adapters (fp32) to the targeted projections."""
    if getattr(model, "lora_config", None) is not None:
        raise PronghornError("this model already has LoRA adapters; merge or remove them before adding new ones")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for _, module in lora_targets(model, config.target_modules, config.layers_to_transform):
        dtype = torch.float64 if module.weight.dtype == torch.float64 else torch.float32  # adapters: >= fp32
        module.add_lora(config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, gen, dtype)
        count += 1
    if count == 0:
        raise PronghornError(f"no module matched target_modules={config.target_modules}")
    model.lora_config = config
    return model


def lora_modules(model: nn.Module) -> Iterator[tuple[str, Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.has_lora:
            yield name, module


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight; the model then has no adapter."""
    for _, module in lora_modules(model):
        module.merge_lora()
    model.lora_config = None
    return model


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch adapters off (the base model) or back on, without removing them."""
    for _, module in lora_modules(model):
        module.lora_enabled = enabled


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
