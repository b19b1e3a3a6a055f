"""One normalised configuration for every supported family, read from a Hugging Face config.json dict."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_DEFAULT_THETA = 10000.0


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: dict[str, Any]  # {"rope_type", "rope_theta", and the type's own keys}
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention" per layer
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)  # the original dict, for export

    def window_of(self, layer_idx: int) -> int | None:
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None

    def to_hf_dict(self) -> dict[str, Any]:
        return dict(self.hf_config)

    # transformers' PretrainedConfig interface, as far as HF Trainer and TRL's SFTTrainer use it
    def to_dict(self) -> dict[str, Any]:
        return {**self.hf_config, "model_type": self.model_type}

    def get_text_config(self, *args: Any, **kwargs: Any) -> "ModelConfig":
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: config.json not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: must hold a JSON object, found {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = d.get("architectures")
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} (architectures {archs}) is not supported; "
                f"pronghorn implements {', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM2 is llama)"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (only silu / SwiGLU)")
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            n_layers = int(d["num_hidden_layers"])
            cfg = dict(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_attention_heads=heads,
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: required field {e.args[0]!r} is missing") from None
        except (TypeError, ValueError):
            bad = next(k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads") if not isinstance(d.get(k), int) or isinstance(d[k], bool))
            raise CheckpointError(f"{source}: field {bad!r} must be an integer, found {d.get(bad)!r}") from None
        kv_heads = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or hidden // heads
        sliding, layer_types = _attention_layout(model_type, d, n_layers)
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        elif model_type == "mistral":
            qkv_bias = o_bias = False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=model_type,
            **cfg,
            num_key_value_heads=int(kv_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=normalise_rope(d, source),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding,
            layer_types=layer_types,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            hf_config=dict(d),
        )


def _attention_layout(model_type: str, d: dict[str, Any], n_layers: int) -> tuple[int | None, list[str]]:
    """Which layers use sliding-window attention, following each family's HF semantics."""
    window = d.get("sliding_window")
    if model_type in ("qwen2", "qwen3"):
        window = window if d.get("use_sliding_window", False) else None
        types = d.get("layer_types") or [
            "sliding_attention" if window is not None and i >= d.get("max_window_layers", 28) else "full_attention"
            for i in range(n_layers)
        ]
    elif model_type == "mistral":
        types = ["sliding_attention" if window is not None else "full_attention"] * n_layers
    else:
        window = None
        types = ["full_attention"] * n_layers
    return window, list(types)


def hf_dtype_name(dtype, default: str) -> str:
    """config.json's ``torch_dtype`` string for a torch float dtype (``default`` for any other)."""
    name = str(dtype).removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else default


def normalise_rope(d: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Merge the old (``rope_theta`` + ``rope_scaling``) and new (``rope_parameters``) HF spellings."""
    rope: dict[str, Any] = {}
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    if isinstance(params, dict):
        rope.update(params)
    scaling = d.get("rope_scaling")
    if isinstance(scaling, dict):
        rope.update(scaling)
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    theta = rope.get("rope_theta") or d.get("rope_theta") or _DEFAULT_THETA
    rope["rope_theta"] = float(theta)
    if d.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError(f"{source}: partial rotary embeddings are not supported")
    return rope
