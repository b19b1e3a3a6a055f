"""Qwen3 (``model_type`` qwen3): Qwen2's layout without the q/k/v biases, with RMSNorm on each q and k head."""

from __future__ import annotations

from .qwen2 import qwen_layer_types
from .spec import LLAMA_GGUF_LAYERS, FamilySpec, LayerParts, activation


def read_config(d: dict, source: str, n_layers: int) -> dict:
    window, types = qwen_layer_types(d, n_layers)
    bias = bool(d.get("attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True,
                parts=LayerParts(activation=activation(d, source)), sliding_window=window, layer_types=types)


SPEC = FamilySpec("qwen3", "Qwen3ForCausalLM", read_config, chat_template="chatml", gguf_arch="qwen3",
                  gguf_layers={**LLAMA_GGUF_LAYERS, "self_attn.q_norm": "attn_q_norm",
                               "self_attn.k_norm": "attn_k_norm"})
