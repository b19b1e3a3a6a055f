"""Write a model (with any LoRA adapter folded in) as a Hugging Face checkpoint directory.

Every adapter is merged as W + s * B A in fp32, one tensor at a time (the model is not modified). For a QLoRA
model (NF4 base weights) the base is the dequantized NF4 weight -- so the quantization error stays in the
merged model -- unless ``base_checkpoint`` points at the original 16-bit checkpoint, whose weights are then
used instead. The weights are written as safetensors shards of at most ``max_shard_size`` bytes (one
``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``), with
config.json, generation_config.json (its eos ids include the tokenizer's EOS, so exported chat models stop)
and the tokenizer files (tokenizer.json, tokenizer_config.json, chat template).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError, PronghornError
from ..files import atomic_dir, chmod_like_mkdir
from ..models.config import hf_dtype_name
from ..models.hf_checkpoint import INDEX, SINGLE, safetensors_files
from ..models.hf_layout import fuse_split
from ..models.linear import Linear

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def is_quantized(module: Linear) -> bool:
    """True when the projection's base weight is stored quantized (an NF4 module, not a tensor)."""
    return not isinstance(module.weight, torch.Tensor)


def _dense(module: Linear) -> torch.Tensor:
    w = module.weight
    if isinstance(w, torch.Tensor):
        return w.detach()
    dense = getattr(module, "dense_weight", None)
    return dense() if callable(dense) else w.dequantize(torch.float32)


class BaseCheckpoint:
    """Lazy access to the tensors of a HF checkpoint dir (one tensor read at a time)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"base_checkpoint {self.path}: not a directory")
        self.where: dict[str, Path] = {}
        for f in safetensors_files(self.path):
            with safe_open(str(f), framework="pt") as st:
                self.where.update({k: f for k in st.keys()})

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"base_checkpoint {self.path}: tensor {name} is missing; it must be the 16-bit "
                                  "checkpoint this model was quantized from")
        with safe_open(str(self.where[name]), framework="pt") as st:
            t = st.get_tensor(name)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"base_checkpoint {self.path}: tensor {name} has shape {tuple(t.shape)}, "
                                  f"the model needs {tuple(shape)}; it is a checkpoint of another model")
        return t


def iter_merged(model: nn.Module, dtype: torch.dtype | None = None,
                base_checkpoint: str | Path | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor on the CPU) for every weight of the merged model, one at a time, in state-dict order.

    Tensors are cast to ``dtype`` (default: each tensor's own dtype; quantized bases: the compute dtype).
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    ckpt = BaseCheckpoint(base_checkpoint) if base_checkpoint is not None else None
    tied = getattr(model.config, "tie_word_embeddings", False)
    done: set[str] = set()
    for key, tensor in model.state_dict(keep_vars=False).items():
        if tied and key == "lm_head.weight":
            continue
        owner = _owner(key, linears)
        if owner is None:
            cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            yield key, tensor.detach().to(cast).contiguous().cpu()
            continue
        if owner in done:
            continue
        done.add(owner)
        m = linears[owner]
        out_dtype = dtype or (m.bias.dtype if m.bias is not None else getattr(m.weight, "dtype", torch.float32))
        yield f"{owner}.weight", _merge(m, base_weight(owner, m, ckpt), out_dtype)
        if m.bias is not None:
            yield f"{owner}.bias", m.bias.detach().to(out_dtype).contiguous().cpu()


def base_weight(name: str, module: Linear, ckpt: BaseCheckpoint | None) -> torch.Tensor:
    """The base weight an adapter is merged into: ``ckpt``'s tensor when given, else the module's own (dense)."""
    if ckpt is not None:
        return ckpt.get(f"{name}.weight", (module.out_features, module.in_features))
    return _dense(module)


@torch.no_grad()
def _merge(m: Linear, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w = base.float()
    if m.has_lora:
        w = w + (m.lora_B.float() @ m.lora_A.float()).to(w.device) * m.lora_scaling
    return w.to(dtype).contiguous().cpu()


def _owner(key: str, linears: dict) -> str | None:
    parts = key.split(".")
    for k in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:k])
        if name in linears:
            return name
    return None


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None,
                      base_checkpoint: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Base weights with W + s * B A for every adapter, computed in fp32, in the family's checkpoint layout
    (fused tensors fused again, models/hf_layout.py); the model is not modified."""
    return dict(fuse_split(model.config, iter_merged(model, dtype, base_checkpoint)))


def parse_size(size: int | str) -> int:
    """Bytes from 5_000_000_000, "5GB", "500MB" or "2GiB" (decimal units as Hugging Face uses them)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise PronghornError(f"max_shard_size {size!r} is not a size (examples: 5GB, 500MB, 2GiB, 1000000)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise PronghornError(f"max_shard_size must be positive, got {size!r}")
    return value


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, max_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, t in tensors:
        n = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + n > max_bytes:
            _save(shards[-1], out / f".shard-{len(shards)}")
            shards[-1] = dict.fromkeys(shards[-1])  # keep the names, drop the tensors
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += n
    if len(shards) == 1:
        _save(shards[0], out / SINGLE)
        return
    _save(shards[-1], out / f".shard-{len(shards)}")
    total = len(shards)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        (out / f".shard-{i}").rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})


def generation_config(model: nn.Module, tokenizer=None) -> dict:
    """The model's generation_config with bos/eos/pad filled in; the tokenizer's EOS is always a stop id."""
    gen = dict(getattr(model, "generation_config", None) or {})
    cfg = model.config
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if gen.get(key) is None and getattr(cfg, key, None) is not None:
            gen[key] = getattr(cfg, key)
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        have = gen.get("eos_token_id")
        have = [] if have is None else [have] if isinstance(have, int) else list(have)
        if eos not in have:
            have.append(eos)
        gen["eos_token_id"] = have[0] if len(have) == 1 else have
    return gen


def save_merged(model: nn.Module, path: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
                overwrite: bool = False, max_shard_size: int | str = "5GB",
                base_checkpoint: str | Path | None = None) -> Path:
    """config.json + safetensors shards (+ generation_config.json, tokenizer files), written atomically."""
    max_bytes = parse_size(max_shard_size)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    quantized = any(is_quantized(m) for m in linears)
    if base_checkpoint is not None:
        logger.info("merging the adapter into the 16-bit weights of %s", base_checkpoint)
    elif quantized:
        warnings.warn("merging the adapter into the dequantized 4-bit (NF4) base weights: the merged model keeps "
                      "the 4-bit rounding of the base. Pass base_checkpoint=<the original 16-bit checkpoint dir> "
                      "(CLI: --base-checkpoint) to merge into the original weights instead", UserWarning,
                      stacklevel=3)
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    config = dict(model.config.to_hf_dict())
    config.pop("quantization_config", None)
    config["torch_dtype"] = hf_dtype_name(dtype, "float32")
    with atomic_dir(path, overwrite=overwrite) as tmp:
        _write_shards(fuse_split(model.config, iter_merged(model, dtype, base_checkpoint)), tmp, max_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = generation_config(model, tokenizer)
        if gen:
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        chmod_like_mkdir(tmp)
    return Path(path)
