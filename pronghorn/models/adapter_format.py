"""PEFT's LoRA adapter format: adapter_config.json + adapter_model.safetensors with PEFT key names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from ..errors import CheckpointError
from .default_model import DEFAULT_HUB_ID, DEFAULT_NAMES
from .fused_adapter import split_adapter_tensors
from .lora import (ALL_TARGETS, LoRAConfig, attach_lora, is_tied, layer_index, lora_modules, lora_targets,
                   trained_modules)
from .wrapped_text import adapter_from_wrapper, wrapper_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# adapter_model.safetensors metadata key: "default" when the adapter was trained on pronghorn's embedded copy of
# DEFAULT_HUB_ID (adapter_config.json names the hub model, for PEFT and others; PEFT ignores this metadata)
PRONGHORN_BASE = "pronghorn_base"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names (``base_model.model.<module>.lora_A.weight``), and the modules trained
    fully (``modules_to_save``) under the names PEFT saves them with: ``base_model.model.model.embed_tokens.weight``,
    ``base_model.model.lm_head.weight`` (a tied table under both, as PEFT's ``ensure_weight_tying`` saves it)."""
    out = {}
    for name, module in lora_modules(model):
        out[f"{_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach()
        out[f"{_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach()
    seen = set()
    for name, weight in trained_modules(model):
        out[f"{_PREFIX}{name}.weight"] = weight.detach() if id(weight) not in seen else weight.detach().clone()
        seen.add(id(weight))
    return out


def adapter_key(parameter_name: str) -> str:
    """The adapter file's key of a trainable parameter: ``...q_proj.lora_A`` -> ``base_model.model...lora_A.weight``,
    ``model.embed_tokens.weight`` -> ``base_model.model.model.embed_tokens.weight``."""
    suffix = ".weight" if parameter_name.endswith(("lora_A", "lora_B")) else ""
    return f"{_PREFIX}{parameter_name}{suffix}"


def base_record(base: str | None) -> tuple[str | None, dict[str, str]]:
    """(base_model_name_or_path, weights metadata) to write for an adapter trained on ``base``: the default model
    is recorded as its hub id, which consumers resolve, and the metadata says pronghorn trained on its local copy."""
    if base in DEFAULT_NAMES:
        return DEFAULT_HUB_ID, {PRONGHORN_BASE: "default"}
    return base, {}


def adapter_base(path: str | Path) -> str | None:
    """The base model an adapter directory applies to, as pronghorn loads it: "default" (the embedded copy it was
    trained on) when the weights' metadata says so, else adapter_config.json's ``base_model_name_or_path``."""
    raw = _raw_config(Path(path) / ADAPTER_CONFIG)
    weights = Path(path) / ADAPTER_WEIGHTS
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as f:
                if (f.metadata() or {}).get(PRONGHORN_BASE) == "default":
                    return "default"
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{weights}: cannot be read ({e})") from None
    return raw.get("base_model_name_or_path")


def peft_config_dict(config: LoRAConfig, base_model_name_or_path: str | None, tied: bool = False) -> dict:
    """adapter_config.json. ``tied``: the model's embedding and head are one table; trained, it is saved as
    ``modules_to_save`` of both with PEFT's ``ensure_weight_tying``, which ties them again on load."""
    saved = list(config.modules_to_save)
    if saved and tied:
        saved = ["embed_tokens", "lm_head"]
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
        "modules_to_save": saved or None,
        "ensure_weight_tying": bool(saved) and tied,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": None,
    }


def _raw_config(cfg_path: Path) -> dict:
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path}: not found (not a PEFT adapter directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: must hold a JSON object, found {type(raw).__name__}")
    return raw


def read_adapter_config(path: str | Path, model: nn.Module | None = None) -> tuple[LoRAConfig, dict]:
    """(LoRAConfig, raw dict) from an adapter directory, refusing what pronghorn cannot represent exactly. A regex
    ``target_modules`` is resolved against ``model``'s projections, as PEFT matches it (without a model: refused)."""
    cfg_path = Path(path) / ADAPTER_CONFIG
    raw = _raw_config(cfg_path)
    if raw.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    for key in ("use_dora", "layers_pattern", "trainable_token_indices"):
        if raw.get(key):
            raise CheckpointError(f"{cfg_path}: field {key!r}={raw[key]!r} is not supported yet")
    if raw.get("fan_in_fan_out"):
        raise CheckpointError(f"{cfg_path}: field 'fan_in_fan_out' is true; only nn.Linear layouts are supported")
    targets = raw.get("target_modules")
    layers = raw.get("layers_to_transform")
    if isinstance(targets, str) and targets != "all-linear":
        if model is None or layers:
            raise CheckpointError(f"{cfg_path}: regex target_modules {targets!r} are not supported; list module names")
        targets, layers = _targets_of_regex(model, targets, cfg_path)
    saved = raw.get("modules_to_save") or []
    if isinstance(saved, str) or not all(isinstance(m, str) for m in saved):
        raise CheckpointError(f"{cfg_path}: field 'modules_to_save' must be a list of module names, got {saved!r}")
    if isinstance(layers, int):
        layers = [layers]
    try:
        config = LoRAConfig(
            r=int(raw["r"]), lora_alpha=float(raw.get("lora_alpha", raw["r"])),
            lora_dropout=float(raw.get("lora_dropout") or 0.0), target_modules=targets,
            use_rslora=bool(raw.get("use_rslora", False)), bias=raw.get("bias", "none"), layers_to_transform=layers,
            modules_to_save=list(saved), rank_pattern=raw.get("rank_pattern") or {},
            alpha_pattern=raw.get("alpha_pattern") or {},
        )
    except KeyError as e:
        raise CheckpointError(f"{cfg_path}: required field {e.args[0]!r} is missing") from None
    except Exception as e:  # LoRAConfig validation
        raise CheckpointError(f"{cfg_path}: {e}") from None
    return config, raw


def _targets_of_regex(model: nn.Module, regex: str, cfg_path: Path) -> tuple[list[str], list[int] | None]:
    """(projection names, layers_to_transform or None) that PEFT's regex ``target_modules`` picks among ``model``'s
    projections, matched as PEFT matches it: the whole module name (an image-text base's name where the model was
    loaded from one). A choice that is not the same projections in each chosen layer is refused."""
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise CheckpointError(f"{cfg_path}: target_modules {regex!r} is not a valid regex ({e})") from None
    wrapper = getattr(model.config, "wrapper", None)
    chosen: dict[str, list[int]] = {}
    for name, _ in lora_targets(model, ALL_TARGETS):
        if pattern.fullmatch(wrapper_name(wrapper, name) if wrapper else name):
            chosen.setdefault(name.split(".")[-1], []).append(layer_index(name))
    layer_sets = {tuple(ls) for ls in chosen.values()}
    if not chosen or len(layer_sets) > 1:
        raise CheckpointError(f"{cfg_path}: regex target_modules {regex!r} picks {chosen or 'no projection'} "
                              "(projection: layers); pronghorn needs the same projections in every chosen layer")
    picked, every = list(layer_sets.pop()), sorted({layer_index(n) for n, _ in lora_targets(model, ALL_TARGETS)})
    return [t for t in ALL_TARGETS if t in chosen], (None if picked == every else picked)


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Attach the adapter stored at ``path`` (PEFT format) to ``model``; every tensor must match a module."""
    path = Path(path)
    config, raw = read_adapter_config(path, model)
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
    tensors = {_strip_adapter_name(k): v for k, v in tensors.items()}
    tensors = adapter_from_wrapper(getattr(model.config, "wrapper", None), tensors)  # an image-text base's names
    _fit_vocab(model, tensors, weights)
    attach_lora(model, config)
    expected = peft_state_dict(model)
    tensors = split_adapter_tensors(model.config, tensors)
    if is_tied(model) and config.modules_to_save:
        _one_table(tensors, raw, weights)
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
        for name, weight in trained_modules(model):
            src = tensors[f"{_PREFIX}{name}.weight"]
            if src.shape != weight.shape:
                raise CheckpointError(f"{weights}: {name} (modules_to_save) has shape {tuple(src.shape)}, the model "
                                      f"needs {tuple(weight.shape)}")
            weight.copy_(src.to(weight.dtype))
    return model


def _fit_vocab(model: nn.Module, tensors: dict[str, torch.Tensor], weights: Path) -> None:
    """An adapter whose trained table has more rows than the base (tokens added with add_new_tokens) resizes the
    base first, as PEFT users call ``resize_token_embeddings`` before loading such an adapter."""
    from .vocab import resize_vocab

    rows = [t.shape[0] for k, t in tensors.items() if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    if rows and max(rows) > model.get_input_embeddings().weight.shape[0]:
        resize_vocab(model, max(rows))


def _one_table(tensors: dict[str, torch.Tensor], raw: dict, weights: Path) -> None:
    """A tied model keeps its embedding and head as one table: the adapter must hold one (PEFT's
    ``ensure_weight_tying``, or both tensors equal); the missing name is filled from the other."""
    embed, head = f"{_PREFIX}model.embed_tokens.weight", f"{_PREFIX}lm_head.weight"
    if embed in tensors and head in tensors:
        if not torch.equal(tensors[embed], tensors[head]):
            raise CheckpointError(f"{weights}: embed_tokens and lm_head differ, but this model ties them (one table); "
                                  "such an adapter needs an untied base")
        return
    if not raw.get("ensure_weight_tying"):
        raise CheckpointError(f"{weights}: modules_to_save trains {'embed_tokens' if embed in tensors else 'lm_head'} "
                              "apart from the table it is tied to, which pronghorn keeps as one parameter; save it "
                              "with PEFT's ensure_weight_tying=True")
    if embed in tensors:
        tensors[head] = tensors[embed]
    elif head in tensors:
        tensors[embed] = tensors[head]


def _strip_adapter_name(key: str) -> str:
    """PEFT's in-memory names (``.lora_A.default.``, ``.modules_to_save.default.``) and older saved ones
    (``.modules_to_save.``) as PEFT saves them now."""
    key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    return key.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
