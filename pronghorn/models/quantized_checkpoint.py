"""QLoRA checkpoints: NF4 projections at load time, and "...-bnb-4bit" checkpoint directories both ways.

Only the attention and MLP projections (``q/k/v/o/gate/up/down_proj``) are quantized; embeddings, ``lm_head``
and norms stay in the model dtype, as bitsandbytes / transformers do. A bnb-4bit directory stores each
quantized projection under bitsandbytes' names (see ``kernels.nf4``) and declares itself in config.json::

    "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true,
                            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
                            "bnb_4bit_compute_dtype": "bfloat16", ...}

Projections such a checkpoint keeps in 16 bits (``llm_int8_skip_modules``) load as ordinary dense weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError
from ..files import atomic_dir
from .config import hf_dtype_name
from ..kernels.nf4 import BNB_KEYS, STATE_KEY, NF4Weight, quantize_nf4
from .linear import Linear
from .lora import ALL_TARGETS



def is_projection_key(key: str) -> bool:
    """True for ``...layers.<i>.<self_attn|mlp>.<x>_proj.weight``: the weights QLoRA stores in 4 bits."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in ALL_TARGETS


def bnb_quantization_config(compute_dtype: torch.dtype, double_quant: bool = True) -> dict[str, Any]:
    """config.json's ``quantization_config`` for an NF4 checkpoint, as transformers writes it."""
    return {
        "_load_in_4bit": True, "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": hf_dtype_name(compute_dtype, "bfloat16"),
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant, "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
        "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    }


def check_quantization_config(hf_config: dict, source: str) -> bool:
    """True for a bitsandbytes NF4 checkpoint config, False for an unquantized one; a clear error otherwise."""
    qc = hf_config.get("quantization_config")
    if qc is None:
        return False
    where = f"{source}: quantization_config"
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where} must be a JSON object")
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise CheckpointError(f"{where}.quant_method is {method!r}; pronghorn reads only bitsandbytes NF4 "
                              "checkpoints (load the 16-bit model and pass load_in_4bit=True instead)")
    if qc.get("load_in_8bit") or not qc.get("load_in_4bit", qc.get("_load_in_4bit", False)):
        raise CheckpointError(f"{where}: only load_in_4bit checkpoints are supported (8-bit LLM.int8 is not)")
    if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise CheckpointError(f"{where}.bnb_4bit_quant_type is {qc.get('bnb_4bit_quant_type', 'fp4')!r}; "
                              "only 'nf4' is supported")
    return True


def read_bnb_weights(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, NF4Weight]:
    """Pop every bitsandbytes 4-bit weight out of ``state_dict``: {"<module>.weight": NF4Weight}."""
    out: dict[str, NF4Weight] = {}
    for key in [k for k in state_dict if ".weight.quant_state.bitsandbytes__" in k]:
        base = key[: key.index(".quant_state.")]
        if not key.endswith(STATE_KEY):
            raise CheckpointError(f"{source}: tensor {key}: only NF4 4-bit weights are supported")
        if base not in state_dict:
            raise CheckpointError(f"{source}: tensor {base} (packed 4-bit data for {key}) is missing")
        parts = {"": state_dict.pop(base)}
        parts.update({s: state_dict.pop(f"{base}.{s}") for s in BNB_KEYS if f"{base}.{s}" in state_dict})
        out[base] = NF4Weight.from_bnb_tensors(parts, source=f"{source}: {base}")
    leftover = [k for k in state_dict if k.rsplit(".", 1)[-1] in ("SCB", "weight_format")]
    if leftover:
        raise CheckpointError(f"{source}: tensor {leftover[0]} is 8-bit (LLM.int8) state; only NF4 is supported")
    return out


def prepare_state_dict(state_dict: dict[str, torch.Tensor], hf_config: dict, load_in_4bit: bool,
                       dtype: torch.dtype, device: torch.device | str, source: str = "checkpoint") -> dict:
    """The state dict ``build_model`` takes: projection weights become ``NF4Weight`` when ``load_in_4bit``.

    A bnb-4bit checkpoint keeps its packed weights as they are (dequantized to dense when not
    ``load_in_4bit``). A 16-bit checkpoint is quantized one projection at a time on ``device`` (each dense
    matrix is dropped from ``state_dict`` once quantized, so the device never holds more than one).
    """
    if check_quantization_config(hf_config, source):
        nf4 = read_bnb_weights(state_dict, source)
        for key, w in nf4.items():
            state_dict[key] = w.with_dtype(dtype) if load_in_4bit else w.dequantize(dtype)
        return state_dict
    if load_in_4bit:
        for key in [k for k in state_dict if is_projection_key(k)]:
            t = state_dict.pop(key)
            state_dict[key] = quantize_nf4(t.to(device=device, dtype=dtype))
            del t
    return state_dict


def quantize_model_nf4(model: nn.Module, blocksize: int = 64, compress_statistics: bool = True) -> nn.Module:
    """Store every attention/MLP projection of a built model as NF4 (in place)."""
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name.split(".")[-1] in ALL_TARGETS:
            module.quantize_nf4(blocksize, compress_statistics)
    return model


def save_bnb_4bit_state(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors as a "...-bnb-4bit" checkpoint stores them (CPU, contiguous, untied).

    Every projection is stored as NF4: an NF4 base without adapter keeps its bits exactly; a dense base (or
    any base with a LoRA adapter, merged as W + s B A in fp32) is quantized now. Other tensors are cast to
    ``dtype`` (default: their own). The model is not modified.
    """
    out: dict[str, torch.Tensor] = {}
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    projections = {f"{n}.weight": m for n, m in model.named_modules()
                   if isinstance(m, Linear) and n.split(".")[-1] in ALL_TARGETS}
    with torch.no_grad():
        for key, module in projections.items():
            out.update({f"{key}.{k}" if k else key: t for k, t in _nf4_for_export(module, dtype).bnb_tensors().items()})
        for key, t in model.state_dict().items():
            base = key.split(".weight.")[0] + ".weight" if ".weight." in key else key
            if base in projections or key.endswith(("lora_A", "lora_B")) or (tied and key == "lm_head.weight"):
                continue
            out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _nf4_for_export(module: Linear, dtype: torch.dtype | None) -> NF4Weight:
    if module.is_quantized and not module.has_lora:
        return module.weight
    w = module.dense_weight().detach()
    if module.has_lora:
        delta = (module.lora_B.float() @ module.lora_A.float()) * module.lora_scaling
        w = (w.float() + delta.to(w.device)).to(w.dtype)
    return quantize_nf4(w, dtype=dtype or w.dtype)


def write_bnb_4bit_files(model: nn.Module, directory: Path, dtype: torch.dtype | None = None) -> None:
    """config.json (with ``quantization_config``) and model.safetensors of a bnb-4bit checkpoint, into an
    existing (temporary) directory."""
    tensors = save_bnb_4bit_state(model, dtype)
    compute = dtype or getattr(model, "dtype", torch.bfloat16)
    config = dict(model.config.to_hf_dict())
    config["quantization_config"] = bnb_quantization_config(compute)
    config["torch_dtype"] = hf_dtype_name(compute, "bfloat16")
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_bnb_4bit_dir(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None,
                      overwrite: bool = False) -> Path:
    """Write config.json (with ``quantization_config``) and model.safetensors of a bnb-4bit checkpoint.

    Tokenizer and generation files are the caller's (the export layer writes them beside these).
    """
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_bnb_4bit_files(model, tmp, dtype)
    return Path(path)
