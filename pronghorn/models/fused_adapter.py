"""PEFT adapters on a family's fused modules (Phi-3's ``qkv_proj``, ``gate_up_proj``) <-> adapters on the
decoder's split projections, both ways exact.

Loading: PEFT's one adapter on a fused module (A [r, in], B [q+k+v, r]) is the same function as one adapter per
part with that A and the part's rows of B. Saving: the parts' adapters (each its own A) become one adapter on the
fused module of rank ``parts x r``: A stacks the parts' As, B is block-diagonal (zero blocks for untargeted parts),
and ``rank_pattern`` / ``alpha_pattern`` give PEFT that rank with the parts' scaling.
"""

from __future__ import annotations

import math

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
    """(PEFT tensors, target_modules, rank_pattern, alpha_pattern) with the parts' adapters on their fused module."""
    fusions = _fusions_by_name(config.model_type)
    owned = {p.split(".")[-1]: name for name, (_, parts, _) in fusions.items() for p in parts}
    targets = [t for t in lora.target_modules if t not in owned]
    fused_used = [n for n in fusions if any(owned.get(t) == n for t in lora.target_modules)]
    out = {k: v for k, v in tensors.items() if k.split(".")[-3] not in owned}
    ranks, alphas = {}, {}
    for name in fused_used:
        fused, parts, sizes = fusions[name]
        present = [p for p in parts if p.split(".")[-1] in lora.target_modules]
        rank = lora.r * len(present)
        scaling = lora.scaling
        ranks[name] = rank
        alphas[name] = scaling * (math.sqrt(rank) if lora.use_rslora else rank)
        layers = sorted({k.split(".layers.")[1].split(".")[0] for k in tensors if f".{present[0]}." in k}, key=int)
        for i in layers:
            base = f"{_PREFIX}model.layers.{i}."
            a = torch.cat([tensors[f"{base}{p}.lora_A.weight"] for p in present])
            b = a.new_zeros(sum(sizes(config)), rank)
            row = 0
            for p, n in zip(parts, sizes(config)):
                if p in present:
                    col = present.index(p) * lora.r
                    b[row:row + n, col:col + lora.r] = tensors[f"{base}{p}.lora_B.weight"]
                row += n
            out[f"{base}{fused}.lora_A.weight"], out[f"{base}{fused}.lora_B.weight"] = a, b
        targets.append(name)
    return out, targets, ranks, alphas
