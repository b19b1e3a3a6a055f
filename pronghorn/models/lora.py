"""Attaching, configuring and merging LoRA adapters on the decoder's projection layers."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..errors import PronghornError
from .families import FAMILIES
from .hf_layout import checkpoint_module
from .linear import Linear

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# modules trained fully beside the adapters (PEFT's ``modules_to_save``); a table tied to the head is one parameter
TRAINABLE_MODULES = ("embed_tokens", "lm_head")
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
    modules_to_save: list[str] = field(default_factory=list)  # among TRAINABLE_MODULES, trained fully
    # PEFT's per-module rank and alpha: a checkpoint module name (Phi-3: the fused qkv_proj / gate_up_proj) or a
    # regex matching its end (see module_rank_alpha) -> that module's rank / alpha, over r / lora_alpha
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = list(ALL_TARGETS) if self.target_modules == "all-linear" else [self.target_modules]
        names = [t.split(".")[-1] for t in self.target_modules]
        names = [part for n in names for part in FUSED_TARGETS.get(n, (n,))]
        full = [t.split(".")[-1] for t in self.modules_to_save or []]
        unknown = sorted((set(names) - set(ALL_TARGETS) - set(TRAINABLE_MODULES)) | (set(full) - set(TRAINABLE_MODULES)))
        if unknown:
            raise PronghornError(f"target_modules {unknown} not supported; choose among {list(ALL_TARGETS)} (LoRA "
                                 f"adapters; the fused {list(FUSED_TARGETS)} mean their parts) and "
                                 f"{list(TRAINABLE_MODULES)} (trained fully)")
        self.target_modules = [t for t in ALL_TARGETS if t in names]
        self.modules_to_save = [t for t in TRAINABLE_MODULES if t in names or t in full]
        if not self.target_modules:
            raise PronghornError(f"target_modules {names} names no projection for LoRA; add at least one of "
                                 f"{list(ALL_TARGETS)} beside {list(TRAINABLE_MODULES)}")
        if self.r <= 0:
            raise PronghornError(f"LoRA rank r must be positive, got {self.r}")
        if not _positive_number(self.lora_alpha):
            raise PronghornError(f"lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        if self.bias != "none":
            raise PronghornError(f"bias={self.bias!r} is not supported; only bias='none' (PEFT's default)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise PronghornError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self.rank_pattern, self.alpha_pattern = dict(self.rank_pattern or {}), dict(self.alpha_pattern or {})
        for what, pattern, ok in (("rank_pattern", self.rank_pattern, lambda v: isinstance(v, int) and v > 0),
                                  ("alpha_pattern", self.alpha_pattern, _positive_number)):
            for key, value in pattern.items():
                if not isinstance(key, str) or not ok(value):
                    raise PronghornError(f"{what} maps module names to positive {what[:-8]}s, got {key!r}: {value!r}")
                try:
                    re.compile(key)
                except re.error as e:
                    raise PronghornError(f"{what} key {key!r} is not a valid regular expression ({e})") from None

    def module_rank_alpha(self, name: str) -> tuple[int, float]:
        """(rank, alpha) of the adapter on the checkpoint module ``name`` (``model.layers.0.self_attn.q_proj``), as
        PEFT's ``get_pattern_key`` matches: the first key of each pattern that, as a regex, matches the whole name
        or its end after a dot; else ``r`` / ``lora_alpha``."""
        return _pattern_value(self.rank_pattern, name, self.r), _pattern_value(self.alpha_pattern, name, self.lora_alpha)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        return asdict(self)


def _positive_number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and x > 0


def _pattern_value(pattern: dict, name: str, default):
    key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", name)), None)
    return default if key is None else pattern[key]


def lora_targets(model: nn.Module, targets: list[str], layers: list[int] | None = None) -> Iterator[tuple[str, Linear]]:
    """(name, Linear) for every projection whose last name part is in ``targets``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name.split(".")[-1] in targets:
            if layers is not None and layer_index(name) not in layers:
                continue
            yield name, module


def layer_index(name: str) -> int | None:
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
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for name, module in lora_targets(model, config.target_modules, config.layers_to_transform):
        dtype = torch.float64 if module.weight.dtype == torch.float64 else torch.float32  # adapters: >= fp32
        r, alpha = config.module_rank_alpha(checkpoint_module(model_type, name))
        module.add_lora(r, alpha, config.lora_dropout, config.use_rslora, gen, dtype)
        count += 1
    if count == 0:
        raise PronghornError(f"no module matched target_modules={config.target_modules}")
    if getattr(model, "needs_embedding_training", False) and set(config.modules_to_save) != set(TRAINABLE_MODULES):
        print("pronghorn: new tokens were added (add_new_tokens), so embed_tokens and lm_head train fully beside "
              "the adapters (as Unsloth does); their learning rate: embedding_learning_rate", flush=True)
        config.modules_to_save = list(TRAINABLE_MODULES)
    model.lora_config = config
    train_fully(model, config.modules_to_save)
    return model


def train_fully(model: nn.Module, names: list[str]) -> None:
    """Make the modules ``names`` (among TRAINABLE_MODULES) trainable as a whole and record them in the model's
    ``lora_config.modules_to_save`` (what the adapter saves). The tables keep their dtype (16-bit on a GPU, also
    under QLoRA, whose NF4 is for the projections only)."""
    config = model.lora_config
    config.modules_to_save = [t for t in TRAINABLE_MODULES if t in names or t in config.modules_to_save]
    for _, p in trained_modules(model, config.modules_to_save):
        _check_trainable_table(model, p)
        p.requires_grad_(True)


def trained_modules(model: nn.Module, names: list[str] | None = None) -> list[tuple[str, nn.Parameter]]:
    """(module path, weight) of the modules trained fully beside the adapters (``names``, default the model's
    ``lora_config.modules_to_save``), in TRAINABLE_MODULES order; a tied table appears under both paths."""
    if names is None:
        config = getattr(model, "lora_config", None)
        names = config.modules_to_save if config is not None else []
    modules = {"embed_tokens": model.get_input_embeddings(), "lm_head": model.get_output_embeddings()}
    paths = {id(m): n for n, m in model.named_modules()}
    out = []
    for name in TRAINABLE_MODULES:
        if name in names:
            out.append((paths[id(modules[name])], modules[name].weight))
    if names and is_tied(model):  # one table: saved (and loaded) under both names, as PEFT's weight tying does
        other = [n for n in TRAINABLE_MODULES if n not in names]
        out += [(paths[id(modules[n])], modules[n].weight) for n in other]
    return out


def is_tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _check_trainable_table(model: nn.Module, weight: torch.Tensor) -> None:
    if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
        raise PronghornError(f"embed_tokens / lm_head must be a 16- or 32-bit table to train, found "
                             f"{type(weight).__name__} {getattr(weight, 'dtype', '')}")
    device = getattr(model, "device", weight.device)
    if weight.device != device and device.type == "cuda":
        raise PronghornError("the input embedding is offloaded to the host (offload_embedding) and cannot be trained "
                             "there; load without offload_embedding to train embed_tokens / lm_head")


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
    """Switch adapters off (the base model) or back on, without removing them. A model whose embeddings or head
    train in place (``modules_to_save``) has no base model to switch to: an error, not the wrong reference."""
    config = getattr(model, "lora_config", None)
    if not enabled and config is not None and config.modules_to_save:
        raise PronghornError(f"the adapters cannot be switched off to give the base model: {config.modules_to_save} "
                             "train in place (no original copy is kept); pass a separate reference model")
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
