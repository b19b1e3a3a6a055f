"""One normalised configuration for every supported family, read from a Hugging Face config.json dict.

The fields every family shares are read here; what differs (biases, sliding-window layout, layer parts) is
read by the family's own spec module (models/families/)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UnsupportedModelError
from .families import FAMILIES, LayerParts
from .wrapped_text import WRAPPERS, text_config

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
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
    parts: LayerParts = field(default_factory=LayerParts)  # what the decoder is assembled from (families/spec.py)
    local_rope: dict[str, Any] | None = None  # sliding layers' own RoPE when it differs from ``rope`` (Gemma 3)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)  # the original dict, for export
    wrapper: str | None = None  # the image-text model_type this text decoder was loaded from (models/wrapped_text.py)

    def window_of(self, layer_idx: int) -> int | None:
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None

    def rope_of(self, layer_idx: int) -> str:
        """Which RoPE table a layer uses: "local" (sliding layers of a family with ``local_rope``) or "global"."""
        return "local" if self.local_rope is not None and self.window_of(layer_idx) is not None else "global"

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
        text = text_config(d, source)  # an image-text checkpoint (Gemma 3 4B+): its text decoder
        wrapper, d = (d.get("model_type"), text) if text is not None else (None, d)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = d.get("architectures")
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} (architectures {archs}) is not supported; "
                f"pronghorn implements {', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM2 is llama), and the text decoder of "
                f"{', '.join(WRAPPERS)} image-text checkpoints"
            )
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
        rope = normalise_rope(d, source)
        fields = FAMILIES[model_type].read_config(d, source, n_layers)
        partial = d.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
        if partial != 1.0 and fields["parts"].rotary_dim is None:
            raise UnsupportedModelError(f"{source}: partial rotary embeddings are not supported for {model_type}")
        return cls(
            model_type=model_type,
            **cfg,
            num_key_value_heads=int(kv_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=rope,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            **fields,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            hf_config=dict(d),
            wrapper=wrapper,
        )


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
    if rope["rope_type"] == "su":  # Phi-3's first name for longrope
        rope["rope_type"] = "longrope"
    if rope["rope_type"] == "longrope" and d.get("original_max_position_embeddings"):  # HF: the top-level one wins
        rope["original_max_position_embeddings"] = d["original_max_position_embeddings"]
    theta = rope.get("rope_theta") or d.get("rope_theta") or _DEFAULT_THETA
    rope["rope_theta"] = float(theta)
    return rope
