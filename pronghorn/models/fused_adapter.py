"""PEFT adapters on a family's fused modules (Phi-3's ``qkv_proj``, ``gate_up_proj``) <-> adapters on the
decoder's split projections, both ways exact.

Loading: PEFT's one adapter on a fused module (A [r, in], B [q+k+v, r]) is the same function as one adapter per
part with that A and the part's rows of B. Saving: the parts' adapters (each its own A) become one adapter on the
fused module of rank ``parts x r``: A stacks the parts' As, B is block-diagonal (zero blocks for untargeted parts),
and ``rank_pattern`` / ``alpha_pattern`` give PEFT that rank with the parts' scaling. An adapter loaded from
a fused one (each part holding its rank R, A repeated) is saved as rank ``parts x R``: the same function.
"""

from __future__ import annotations

import math
import re

import torch

from .families import family
from .lora import LoRAConfig

_PREFIX = "base_model.model."


def _fusions_by_name(model_type: str) -> dict[str, tuple]:
    """fused module's last name ("qkv_proj") -> (its per-layer name, part per-layer names, sizes function)."""
    return {f.fused.split(".")[-1]: (f.fused, f.parts, f.sizes) for f in family(model_type).fusions}


def split_adapter_tensors(config, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT tensors (names without the adapter name) with every fused module's adapter given to its parts."""
    out = {}
    for key, t in tensors.items():
        hit = next((f for f in _fusions_by_name(config.model_type).values() if f".{f[0]}." in key), None)
        if hit is None:
            out[key] = t
            continue
        fused, parts, sizes = hit
        prefix, suffix = key.split(f".{fused}.")
        pieces = [t] * len(parts) if suffix.startswith("lora_A") else torch.split(t, sizes(config), dim=0)
        for part, piece in zip(parts, pieces):
            out[f"{prefix}.{part}.{suffix}"] = piece.contiguous()
    return out


def fuse_adapter(config, lora: LoRAConfig, tensors: dict[str, torch.Tensor]) -> tuple[dict, list, dict, dict]:
    """(PEFT tensors, target_modules, rank_pattern, alpha_pattern) with the parts' adapters on their fused module;
    the patterns give every adapter whose rank or alpha is not ``lora.r`` / ``lora.lora_alpha`` its own."""
    fusions = _fusions_by_name(config.model_type)
    owned = {p.split(".")[-1]: name for name, (_, parts, _) in fusions.items() for p in parts}
    targets = [t for t in lora.target_modules if t not in owned]
    fused_used = [n for n in fusions if any(owned.get(t) == n for t in lora.target_modules)]
    out = {k: v for k, v in tensors.items() if k.split(".")[-3] not in owned}
    modules = {k[len(_PREFIX):-len(".lora_A.weight")]: None for k in out if k.endswith(".lora_A.weight")}
    modules = {name: lora.module_rank_alpha(name) for name in modules}  # checkpoint module -> (rank, alpha)
    for name in fused_used:
        fused, parts, sizes = fusions[name]
        present = [p for p in parts if p.split(".")[-1] in lora.target_modules]
        layers = sorted({k.split(".layers.")[1].split(".")[0] for k in tensors if f".{present[0]}." in k}, key=int)
        for i in layers:
            base = f"{_PREFIX}model.layers.{i}."
            a_parts = [tensors[f"{base}{p}.lora_A.weight"] for p in present]
            rank, cols = sum(t.shape[0] for t in a_parts), 0
            b = a_parts[0].new_zeros(sum(sizes(config)), rank)
            row = 0
            for p, n in zip(parts, sizes(config)):
                if p in present:
                    part_b = tensors[f"{base}{p}.lora_B.weight"]
                    b[row:row + n, cols:cols + part_b.shape[1]] = part_b
                    cols += part_b.shape[1]
                row += n
            out[f"{base}{fused}.lora_A.weight"], out[f"{base}{fused}.lora_B.weight"] = torch.cat(a_parts), b
            part_rank, part_alpha = lora.module_rank_alpha(f"model.layers.{i}.{fused}")  # every part's own
            scaling = part_alpha / (math.sqrt(part_rank) if lora.use_rslora else part_rank)
            modules[f"model.layers.{i}.{fused}"] = (rank, scaling * (math.sqrt(rank) if lora.use_rslora else rank))
        targets.append(name)
    return out, targets, *_patterns(modules, lora.r, lora.lora_alpha)


def _patterns(modules: dict[str, tuple[int, float]], r: int, alpha: float) -> tuple[dict, dict]:
    """(rank_pattern, alpha_pattern) for PEFT: the values that differ from ``r`` / ``alpha``, keyed by the modules'
    last name where every module of that name has the same value, else by each full name (regex-escaped)."""
    out = []
    for index, default in ((0, r), (1, alpha)):
        groups: dict[str, list[str]] = {}
        for name in modules:
            groups.setdefault(name.split(".")[-1], []).append(name)
        pattern = {}
        for short, names in groups.items():
            values = {modules[n][index] for n in names}
            if values == {default}:
                continue
            if len(values) == 1:
                pattern[short] = values.pop()
            else:
                pattern.update({re.escape(n): modules[n][index] for n in names if modules[n][index] != default})
        out.append(pattern)
    return out[0], out[1]
