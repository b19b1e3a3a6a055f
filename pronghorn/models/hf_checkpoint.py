"""Reading Hugging Face checkpoint directories: config.json + safetensors (single file or sharded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint dir, refusing pickle-only checkpoints."""
    if (path / INDEX).is_file():
        try:
            index = json.loads((path / INDEX).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{path / INDEX}: malformed shard index ({e!r})") from None
        files = [path / n for n in names]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {INDEX} is missing")
        return files
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    singles = sorted(path.glob("*.safetensors"))
    if singles:
        return singles
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(f"{path}: only pickle weights (*.bin/*.pt) found; pronghorn loads safetensors only "
                              "(pickle can run code). Convert the checkpoint to safetensors first.")
    raise CheckpointError(f"{path}: no model.safetensors or {INDEX} found")


def read_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint dir, cast to ``dtype`` if given."""
    out: dict[str, torch.Tensor] = {}
    for f in safetensors_files(Path(path)):
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    t = st.get_tensor(key)
                    out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot be read as safetensors ({e})") from None
    return out
