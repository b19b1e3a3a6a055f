"""One entry point for every checkpoint source: "default", a HF directory, a .gguf file, a hub id, an adapter dir."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .adapter_format import adapter_base, is_adapter_dir, load_adapter
from .builder import build_model
from .config import ModelConfig
from .decoder import DecoderForCausalLM
from .default_model import DEFAULT_NAMES
from .hf_checkpoint import read_state_dict
from .hf_layout import split_fused
from .precision import default_dtype, warn_if_fp16_overflows
from .quantized_checkpoint import prepare_state_dict
from .wrapped_text import text_state_dict

@dataclass
class Loaded:
    model: DecoderForCausalLM
    tokenizer: object
    base_name: str  # what to record as base_model_name_or_path
    base_dir: Path | None  # the local HF directory of the base weights, when there is one


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_local(name: str, token: str | None = None, revision: str | None = None) -> tuple[Path, str]:
    """(local path, name to record) for a model name: "default", a path, or a Hugging Face hub id."""
    if name in DEFAULT_NAMES:
        from .default_model import default_model_dir

        return default_model_dir(), "default"
    path = Path(os.path.expanduser(name))
    if path.exists():
        return path, str(name)
    check_hub_id(name)
    return _download(name, token, revision), name


def check_hub_id(name: str) -> None:
    """Raise for a name that is neither an existing path nor a hub id (owner/name)."""
    if name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") != 1:
        raise CheckpointError(f"{name}: no such file or directory (and not a hub id of the form owner/name)")


def _download(repo_id: str, token: str | None, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise CheckpointError(
            f"{repo_id}: could not download from the Hugging Face hub ({type(e).__name__}: {e}). "
            "If this machine is offline, pass a local checkpoint directory, a .gguf file, or 'default'."
        ) from None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise CheckpointError(f"{path}: tokenizer could not be loaded ({type(e).__name__}: {e})") from None


def load_pretrained(name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                    model_cls: type[DecoderForCausalLM] = DecoderForCausalLM, token: str | None = None,
                    revision: str | None = None, load_in_4bit: bool = False) -> Loaded:
    """Load a base model (or a base + PEFT adapter when ``name`` is an adapter directory) and its tokenizer."""
    device = torch.device(device) if device is not None else default_device()
    path, recorded = resolve_local(str(name), token, revision)
    if path.is_dir() and is_adapter_dir(path):
        base = adapter_base(path)
        if not base:
            raise CheckpointError(f"{path / 'adapter_config.json'}: field 'base_model_name_or_path' is empty; "
                                  "load the base model first and attach the adapter")
        loaded = load_pretrained(base, dtype, device, model_cls, token, load_in_4bit=load_in_4bit)
        load_adapter(loaded.model, path)
        loaded.model.to(device)
        if (path / "tokenizer_config.json").is_file():
            loaded.tokenizer = load_tokenizer(path)
        return loaded
    if path.is_file() and path.suffix == ".gguf":
        from .gguf_loading import load_gguf_tokenizer, read_gguf

        ckpt = read_gguf(path)
        cfg = ModelConfig.from_hf_dict(ckpt.config, source=str(path))
        dtype = _dtype_for(cfg, dtype, device, str(path))
        hf_sd = split_fused(cfg, ckpt.state_dict, str(path))  # the family's fused tensors (Phi-3), split
        sd = prepare_state_dict(hf_sd, ckpt.config, load_in_4bit, dtype, device, str(path))
        model = build_model(cfg, sd, dtype, device, str(path), model_cls)
        tokenizer = load_gguf_tokenizer(path)
        base_dir = None
    elif path.is_dir():
        cfg = ModelConfig.from_file(path / "config.json")
        dtype = _dtype_for(cfg, dtype, device, str(path))
        hf_sd = text_state_dict(read_state_dict(path))  # an image-text checkpoint's: its text decoder's
        hf_sd = split_fused(cfg, hf_sd, str(path))  # the family's fused tensors, split
        sd = prepare_state_dict(hf_sd, cfg.hf_config, load_in_4bit, dtype, device, str(path))
        model = build_model(cfg, sd, dtype, device, str(path), model_cls)
        tokenizer = load_tokenizer(path)
        base_dir = path
    else:
        raise CheckpointError(f"{path}: not a checkpoint directory, adapter directory or .gguf file")
    model.name_or_path = recorded
    _apply_generation_config(model, path)
    return Loaded(model, tokenizer, recorded, base_dir)


def _dtype_for(cfg: ModelConfig, dtype: torch.dtype | None, device: torch.device, source: str) -> torch.dtype:
    """The dtype asked for (warned if the family overflows it), else the device's default for the family."""
    if dtype is None:
        return default_dtype(device, cfg.model_type)
    warn_if_fp16_overflows(cfg.model_type, dtype, source)
    return dtype


def _apply_generation_config(model: DecoderForCausalLM, path: Path) -> None:
    gen = path / "generation_config.json" if path.is_dir() else None
    model.generation_config = {}
    if gen is not None and gen.is_file():
        try:
            model.generation_config = json.loads(gen.read_text())
        except json.JSONDecodeError:
            pass
