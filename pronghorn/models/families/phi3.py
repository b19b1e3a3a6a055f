"""Phi-3 / 3.5 / Phi-4-mini (``model_type`` phi3): Llama's parts, with checkpoints that store the attention
projections fused (``self_attn.qkv_proj``: q, k, v rows) and the MLP's (``mlp.gate_up_proj``: gate, up rows),
split on load and fused again on export (models/hf_layout.py); LongRoPE ("su") scaling with short and long
factors; partial rotary (Phi-4-mini's 0.75); an optional sliding window on every layer. GGUF: llama.cpp's
``phi3`` (the fused tensors as ``attn_qkv`` / ``ffn_up``, the LongRoPE factors as tensors), written and read."""

from __future__ import annotations

import math

from ...errors import CheckpointError
from .spec import FamilySpec, Fusion, LayerParts, activation, uniform_layers


def _qkv_rows(cfg) -> list[int]:
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return [q, kv, kv]


def _gate_up_rows(cfg) -> list[int]:
    return [cfg.intermediate_size, cfg.intermediate_size]


def rotary_dim(d: dict) -> int | None:
    """The rotated features per head when ``partial_rotary_factor`` < 1 (top level or in the RoPE dict)."""
    head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    factor = d.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
    return None if factor == 1.0 else int(head_dim * factor)


def read_config(d: dict, source: str, n_layers: int) -> dict:
    window = d.get("sliding_window")
    return dict(qkv_bias=False, o_bias=False, mlp_bias=False,
                parts=LayerParts(activation=activation(d, source), rotary_dim=rotary_dim(d)),
                sliding_window=window, layer_types=uniform_layers(window, n_layers))


def gguf_metadata(writer, cfg) -> None:
    """What llama.cpp's converter writes for phi3 beyond the common keys: the sliding window (0: none), and for
    LongRoPE the original context, the attention factor and the two factor tables as tensors."""
    import numpy as np

    writer.add_sliding_window(cfg.sliding_window or 0)
    rope = cfg.rope
    if rope["rope_type"] == "longrope":
        original = rope["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        scale = cfg.max_position_embeddings / original
        attn = rope.get("attention_factor")
        if attn is None:
            attn = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        writer.add_rope_scaling_attn_factors(attn)
        writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))


def gguf_read(field, config: dict) -> dict:
    """config.json fields from llama.cpp's phi3 keys: the sliding window (0: none), partial rotary (a rope
    dimension count below head_dim) and LongRoPE's original context (the factor tables: gguf_loading)."""
    out = {"sliding_window": field("attention.sliding_window") or None}
    rotated = field("rope.dimension_count")
    if rotated and rotated != config["head_dim"]:
        out["partial_rotary_factor"] = rotated / config["head_dim"]
        if int(config["head_dim"] * out["partial_rotary_factor"]) != rotated:  # rotary_dim() must read it back
            raise CheckpointError(f"phi3 GGUF: rope.dimension_count {rotated} is no fraction of head_dim "
                                  f"{config['head_dim']} that config.json can state")
    if field("rope.scaling.original_context_length"):
        out["original_max_position_embeddings"] = field("rope.scaling.original_context_length")
    return out


GGUF_LAYERS = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

SPEC = FamilySpec(
    "phi3", "Phi3ForCausalLM", read_config, chat_template="phi-3",
    fusions=(Fusion("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), _qkv_rows),
             Fusion("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"), _gate_up_rows)),
    gguf_arch="phi3", gguf_reads=True, gguf_layers=GGUF_LAYERS, gguf_rope_types=("default", "longrope"),
    gguf_metadata=gguf_metadata, gguf_read=gguf_read,
)
