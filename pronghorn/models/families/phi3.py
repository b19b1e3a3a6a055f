"""Phi-3 / 3.5 / Phi-4-mini (``model_type`` phi3): Llama's parts, with checkpoints that store the attention
projections fused (``self_attn.qkv_proj``: q, k, v rows) and the MLP's (``mlp.gate_up_proj``: gate, up rows),
split on load and fused again on export (models/hf_layout.py); LongRoPE ("su") scaling with short and long
factors; partial rotary (Phi-4-mini's 0.75); an optional sliding window on every layer."""

from __future__ import annotations

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


SPEC = FamilySpec(
    "phi3", "Phi3ForCausalLM", read_config, chat_template="phi-3",
    fusions=(Fusion("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), _qkv_rows),
             Fusion("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"), _gate_up_rows)),
)
