"""Build a model from a config and a state dict (loaded weights) or from random initialisation."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError, UnsupportedModelError
from .config import ModelConfig
from .decoder import DecoderForCausalLM
from .rope_scaling import rope_inv_freq


def build_model(config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device | str = "cpu", source: str = "checkpoint",
                model_cls: type[DecoderForCausalLM] = DecoderForCausalLM) -> DecoderForCausalLM:
    """Instantiate on the meta device and adopt the given tensors (no double allocation)."""
    _check_rope(config, source)
    with torch.device("meta"):
        model = model_cls(config, dtype=dtype)
    expected = dict(model.state_dict())
    sd = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: tensors do not match a {config.model_type} model "
            f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''})"
        )
    for key, ref in expected.items():
        if tuple(sd[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(sd[key].shape)}, "
                                  f"config.json implies {tuple(ref.shape)}")
    nf4 = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}  # QLoRA bases (kernels.nf4.NF4Weight)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items() if k not in nf4}
    model.load_state_dict(sd, strict=False, assign=True)
    for key, w in nf4.items():
        model.get_submodule(key.rsplit(".", 1)[0]).use_nf4(w.to(device).with_dtype(dtype))
    model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def _check_rope(config: ModelConfig, source: str) -> None:
    """Fail at load time, naming the checkpoint, not at the first forward pass."""
    try:
        for rope in (config.rope, config.local_rope or config.rope):
            rope_inv_freq(rope, config.parts.rotary_dim or config.head_dim, config.max_position_embeddings)
    except (UnsupportedModelError, CheckpointError) as e:
        raise type(e)(f"{source}: {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{source}: rope scaling {config.rope.get('rope_type')!r} needs the field "
                              f"{e.args[0]!r}, which the config lacks") from None


def init_random_model(config: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                      std: float = 0.02, model_cls: type[DecoderForCausalLM] = DecoderForCausalLM) -> DecoderForCausalLM:
    """A randomly initialised model (normal(0, std) matrices, unit-scale norms), e.g. for benchmarks."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.constant_(p, 1.0 - config.parts.norm_offset)  # a unit scale (Gemma's (1 + w): w = 0)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, std)
    model.tie_weights()
    return model.eval()
