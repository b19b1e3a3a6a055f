"""A family's Hugging Face tensor layout <-> the decoder's own parameter names.

The decoder keeps every projection apart (``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``) so one
set of kernels serves every family. A family whose checkpoints store some of them fused (Phi-3's
``qkv_proj`` and ``gate_up_proj``, see ``FamilySpec.fusions``) is split here on load and fused again on export.
For the other families both functions pass tensors through unchanged.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from ..errors import CheckpointError
from .families import family


def split_fused(config, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """``state_dict`` (HF names) with every fused tensor of the family split into its parts (in place)."""
    for fusion in family(config.model_type).fusions:
        sizes = fusion.sizes(config)
        suffix = f".{fusion.fused}.weight"
        for key in [k for k in state_dict if k.endswith(suffix)]:
            t = state_dict.pop(key)
            if t.shape[0] != sum(sizes):
                raise CheckpointError(f"{source}: tensor {key} has {t.shape[0]} rows, config.json implies "
                                      f"{sum(sizes)} ({' + '.join(map(str, sizes))})")
            prefix = key[: -len(suffix)]
            for part, piece in zip(fusion.parts, torch.split(t, sizes, dim=0)):
                state_dict[f"{prefix}.{part}.weight"] = piece.contiguous()
    return state_dict


def fuse_split(config, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) in the family's checkpoint layout from the decoder's (name, tensor) stream: parts of a
    fused tensor are held until the last arrives, then written as one."""
    fusions = family(config.model_type).fusions
    owner = {f".{part}.weight": fusion for fusion in fusions for part in fusion.parts}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors:
        suffix = next((s for s in owner if name.endswith(s)), None)
        if suffix is None:
            yield name, t
            continue
        fusion, prefix = owner[suffix], name[: -len(suffix)]
        parts = pending.setdefault(prefix + "." + fusion.fused, {})
        parts[suffix[1:].removesuffix(".weight")] = t
        if len(parts) == len(fusion.parts):
            del pending[prefix + "." + fusion.fused]
            yield f"{prefix}.{fusion.fused}.weight", torch.cat([parts[p] for p in fusion.parts], dim=0)
    if pending:
        raise CheckpointError(f"incomplete fused tensors {sorted(pending)} (a part is missing)")


def checkpoint_module(model_type: str | None, name: str) -> str:
    """The family's checkpoint name of the decoder's module ``name``: the fused module a part belongs to
    (Phi-3: ``model.layers.0.self_attn.q_proj`` -> ``model.layers.0.self_attn.qkv_proj``), else ``name``."""
    for fusion in family(model_type).fusions if model_type else ():
        for part in fusion.parts:
            if name.endswith("." + part):
                return name[: -len(part)] + fusion.fused
    return name
