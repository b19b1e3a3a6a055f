"""Training checkpoints: adapter (PEFT format) + optimizer state + RNG + progress, written atomically.

Everything is safetensors or JSON, so resuming never unpickles a file.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..export.adapter import save_adapter
from ..files import atomic_dir
from ..models.adapter_format import ADAPTER_WEIGHTS, adapter_key

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng_state.safetensors"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    base_name: str | None) -> Path:
    with atomic_dir(path, overwrite=True) as tmp:
        save_adapter(model, tmp, base_model_name_or_path=base_name, overwrite=True)
        names = {id(p): n for n, p in _trainable(model)}
        tensors = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    tensors[f"{names[id(p)]}::{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        save_file(tensors, str(tmp / OPTIMIZER))
        save_rng_state(tmp)
        (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")
    return path


def save_rng_state(directory: Path) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(directory / RNG))


def load_rng_state(directory: Path) -> None:
    rng = load_file(str(directory / RNG))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore adapter weights, optimizer moments and RNG from ``path``; return the saved trainer state."""
    if (path / "sharded").is_dir():
        raise CheckpointError(f"{path}: a sharded full fine-tuning checkpoint, but this model trains LoRA "
                              "adapters; resume it with the same (full fine-tuning) setup")
    for name in (STATE, OPTIMIZER, RNG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing; {path} is not a complete pronghorn checkpoint")
    adapter = load_file(str(path / ADAPTER_WEIGHTS))
    opt = load_file(str(path / OPTIMIZER))
    params = dict(_trainable(model))
    with torch.no_grad():
        for name, p in params.items():
            key = adapter_key(name)
            if key not in adapter:
                raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: tensor {key} missing for this model")
            p.copy_(adapter[key].to(p.dtype))
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = next(n for n, q in params.items() if q is p)
            st = {k.split("::", 1)[1]: v.to(p.device) for k, v in opt.items() if k.split("::", 1)[0] == name}
            if st:
                st["step"] = st["step"].cpu()
                optimizer.state[p] = st
    load_rng_state(path)
    return json.loads((path / STATE).read_text())


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*") if (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE).is_file()]


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else list_checkpoints(output_dir):
        shutil.rmtree(old, ignore_errors=True)
