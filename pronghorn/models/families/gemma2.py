"""Gemma 2 (``model_type`` gemma2): Gemma's parts plus sandwich norms (after attention and around the MLP),
tanh soft-capping of the attention scores and of the final logits, the score scale
``query_pre_attn_scalar ** -0.5``, and a sliding window on alternate layers (the even ones)."""

from __future__ import annotations

from ...errors import UnsupportedModelError
from .gemma import GGUF_CONFIG, gemma_activation, llama_cpp_query_scalar, warn_if_llama_cpp_scales_otherwise
from .spec import SANDWICH_GGUF_LAYERS, FamilySpec, LayerParts


def gemma_window(d: dict, source: str, n_layers: int, pattern: int) -> tuple[int | None, list[str]]:
    """(window, layer types): ``layer_types`` when given, else every ``pattern``-th layer full attention."""
    if d.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{source}: use_bidirectional_attention (an encoder config) is not supported")
    types = d.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)
    ]
    return d.get("sliding_window"), list(types)


def read_config(d: dict, source: str, n_layers: int) -> dict:
    bias = bool(d.get("attention_bias", False))
    window, types = gemma_window(d, source, n_layers, pattern=2)
    parts = LayerParts(
        activation=gemma_activation(d, source, "hidden_activation"), norm_offset=1.0, sandwich_norms=True,
        embed_scale=float(d["hidden_size"]) ** 0.5, attn_scale=float(d.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=d.get("attn_logit_softcapping", 50.0), final_softcap=d.get("final_logit_softcapping", 30.0),
    )
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=False, parts=parts, sliding_window=window, layer_types=types)


def gguf_metadata(writer, cfg) -> None:
    """llama.cpp's gemma2 keys: the two soft-caps and the sliding window (of the alternate layers)."""
    warn_if_llama_cpp_scales_otherwise(cfg, layers_27b=46)
    if cfg.parts.attn_softcap:
        writer.add_attn_logit_softcapping(cfg.parts.attn_softcap)
    if cfg.parts.final_softcap:
        writer.add_final_logit_softcapping(cfg.parts.final_softcap)
    if cfg.sliding_window is not None:
        writer.add_sliding_window(cfg.sliding_window)


def gguf_read(field, config: dict) -> dict:
    out = {"query_pre_attn_scalar": llama_cpp_query_scalar(config, layers_27b=46)}
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):  # absent: the family's defaults
        if field(key) is not None:
            out[key] = field(key)
    out["sliding_window"] = field("attention.sliding_window")
    return out


SPEC = FamilySpec("gemma2", "Gemma2ForCausalLM", read_config, chat_template="gemma2", gguf_arch="gemma2",
                  gguf_reads=True, gguf_layers=SANDWICH_GGUF_LAYERS, gguf_config=GGUF_CONFIG,
                  gguf_metadata=gguf_metadata, gguf_read=gguf_read)
