"""Gemma 3 text (``model_type`` gemma3_text, Gemma3ForCausalLM): Gemma 2's sandwich layers with RMSNorm
(1 + w) on each q and k head instead of score soft-capping, five sliding-window layers to one global, and two
RoPEs: the sliding layers' own base (``rope_local_base_freq`` / ``rope_parameters.sliding_attention``,
unscaled) and the global layers' (scaled). The final logits are soft-capped only when config.json sets
``final_logit_softcapping``; ``attn_logit_softcapping`` is ignored, as transformers' Gemma 3 attention does."""

from __future__ import annotations

from .gemma import GGUF_CONFIG, gemma_activation, llama_cpp_query_scalar, warn_if_llama_cpp_scales_otherwise
from .gemma2 import gemma_window
from .spec import SANDWICH_GGUF_LAYERS, FamilySpec, LayerParts


def local_rope(d: dict) -> dict:
    params = d.get("rope_parameters")
    rope = dict(params["sliding_attention"]) if isinstance(params, dict) and "sliding_attention" in params else {}
    rope.setdefault("rope_type", "default")
    rope["rope_theta"] = float(rope.get("rope_theta") or d.get("rope_local_base_freq") or 10000.0)
    return rope


def read_config(d: dict, source: str, n_layers: int) -> dict:
    bias = bool(d.get("attention_bias", False))
    window, types = gemma_window(d, source, n_layers, pattern=d.get("sliding_window_pattern", 6))
    parts = LayerParts(
        activation=gemma_activation(d, source, "hidden_activation"), norm_offset=1.0, sandwich_norms=True,
        embed_scale=float(d["hidden_size"]) ** 0.5, attn_scale=float(d.get("query_pre_attn_scalar", 256)) ** -0.5,
        final_softcap=d.get("final_logit_softcapping"),
    )
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True, parts=parts, sliding_window=window,
                layer_types=types, local_rope=local_rope(d))


def gguf_metadata(writer, cfg) -> None:
    """llama.cpp's gemma3 keys: the sliding window, the sliding layers' pattern and their RoPE base."""
    warn_if_llama_cpp_scales_otherwise(cfg, layers_27b=62)
    if cfg.sliding_window is not None:
        writer.add_sliding_window(cfg.sliding_window)
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    writer.add_rope_freq_base_swa(cfg.local_rope["rope_theta"])
    if cfg.parts.final_softcap:
        writer.add_final_logit_softcapping(cfg.parts.final_softcap)


def gguf_read(field, config: dict) -> dict:
    out = {"query_pre_attn_scalar": llama_cpp_query_scalar(config, layers_27b=62),
           "sliding_window": field("attention.sliding_window"),
           "rope_local_base_freq": field("rope.freq_base_swa") or 10000.0}
    pattern = field("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
    if field("final_logit_softcapping") is not None:
        out["final_logit_softcapping"] = field("final_logit_softcapping")
    return out


SPEC = FamilySpec("gemma3_text", "Gemma3ForCausalLM", read_config, chat_template="gemma3", gguf_arch="gemma3",
                  gguf_reads=True, gguf_config=GGUF_CONFIG, gguf_read=gguf_read,
                  gguf_layers={**SANDWICH_GGUF_LAYERS, "self_attn.q_norm": "attn_q_norm",
                               "self_attn.k_norm": "attn_k_norm"},
                  gguf_metadata=gguf_metadata, fp16_overflows=True)
