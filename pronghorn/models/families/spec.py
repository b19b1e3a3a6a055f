"""What a model family is: the record each ``families/<name>.py`` fills in, and the layer parts it picks.

The decoder (models/decoder.py) is one module assembled from :class:`LayerParts`; a family differs from
another only by the values here. A family module holds everything about its checkpoints: how config.json
reads (``read_config``), which parts its layers use, its Hugging Face tensor layout (``fusions``: tensors a
checkpoint stores fused, split on load and fused again on export), its GGUF architecture and tensor names,
and its chat template's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# HF per-layer module name -> llama.cpp tensor stem, as llama.cpp's converter names Llama-like layers.
LLAMA_GGUF_LAYERS: dict[str, str] = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip
# Gemma 2/3's sandwich norms as llama.cpp names them
SANDWICH_GGUF_LAYERS: dict[str, str] = {
    **LLAMA_GGUF_LAYERS, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
GGUF_GLOBALS: dict[str, str] = {"model.embed_tokens.weight": "token_embd.weight",
                                "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}

# hidden_act / hidden_activation of config.json -> the gated MLP's activation (kernels.swiglu / kernels.geglu)
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
               "gelu": "gelu"}


@dataclass(frozen=True)
class LayerParts:
    """The parts a decoder layer and the model around it are assembled from (defaults: Llama's)."""

    activation: str = "silu"  # gated MLP: "silu" (SwiGLU), "gelu_tanh" or "gelu" (GeGLU)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w): 1.0 for Gemma's (1 + w)
    sandwich_norms: bool = False  # a norm after attention and one after the MLP too (Gemma 2/3 names)
    embed_scale: float = 1.0  # token embeddings are multiplied by this (sqrt(hidden) for Gemma)
    attn_scale: float | None = None  # the attention score scale; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> c * tanh(scores / c) before the mask
    final_softcap: float | None = None  # logits -> c * tanh(logits / c)
    rotary_dim: int | None = None  # RoPE on the first rotary_dim of each head (partial rotary); None: all


@dataclass(frozen=True)
class Fusion:
    """One tensor a family's checkpoints store fused: ``fused`` (a per-layer module name such as
    ``self_attn.qkv_proj``) holds ``parts`` stacked along the output dimension, ``sizes(cfg)`` rows each."""

    fused: str
    parts: tuple[str, ...]
    sizes: Callable[[Any], list[int]]


@dataclass(frozen=True)
class FamilySpec:
    """One model family (a config.json ``model_type``)."""

    model_type: str
    hf_architecture: str  # config.json "architectures" entry
    read_config: Callable[[dict, str, int], dict]  # (config.json dict, source, n_layers) -> ModelConfig fields
    chat_template: str | None = None  # its built-in chat template (data/chat_templates.py; Unsloth's names)
    fusions: tuple[Fusion, ...] = ()
    gguf_arch: str | None = None  # llama.cpp architecture written on export (None: no GGUF export)
    gguf_reads: bool = False  # GGUF files of ``gguf_arch`` load as this family
    # transformers' tokenizer class for such a file where transformers' GGUF reading lacks the architecture
    # (AutoTokenizer refuses it; the class reads the file's tokenizer all the same)
    gguf_tokenizer_class: str | None = None
    gguf_permute_qk: bool = False  # llama.cpp's interleaved-rope row order for q/k ("llama" arch)
    gguf_layers: dict[str, str] = field(default_factory=lambda: dict(LLAMA_GGUF_LAYERS))
    gguf_config: dict[str, Any] = field(default_factory=dict)  # config.json fields a GGUF of it implies
    gguf_rope_types: tuple[str, ...] = ("default", "linear", "yarn", "llama3")  # RoPE scalings llama.cpp runs
    # (gguf.GGUFWriter, ModelConfig) -> None: the architecture's own keys (soft-caps, sliding window, ...)
    gguf_metadata: Callable[[Any, Any], None] | None = None
    # (field: "<arch>.<key>" -> value or None, config.json dict so far) -> the fields those keys give on reading
    gguf_read: Callable[[Callable[[str], Any], dict], dict] | None = None
    # its published weights drive activations past float16's range: computes in fp32 where a GPU lacks bf16
    # (models/precision.py)
    fp16_overflows: bool = False


def activation(d: dict, source: str, key: str = "hidden_act", default: str = "silu",
               allowed: tuple[str, ...] = ("silu",)) -> str:
    """The gated MLP's activation named by config.json's ``key``, refused clearly when the family has no such MLP."""
    from ...errors import UnsupportedModelError

    name = d.get(key) or default
    act = ACTIVATIONS.get(name)
    if act not in allowed:
        raise UnsupportedModelError(f"{source}: {key} {name!r} is not supported for model_type "
                                    f"{d.get('model_type')!r} (supported: {', '.join(allowed)})")
    return act


def uniform_layers(window: int | None, n_layers: int) -> list[str]:
    """Every layer sliding-window (when there is a window) or every layer full attention."""
    return ["sliding_attention" if window is not None else "full_attention"] * n_layers
