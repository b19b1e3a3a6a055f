"""Gemma (``model_type`` gemma): embeddings scaled by sqrt(hidden), RMSNorm scaling by (1 + w), a GeGLU MLP
with the tanh GELU (config.json's legacy "gelu" means it too, as transformers reads it), head_dim 256 in the
released sizes, and a tied head. GGUF (llama.cpp's ``gemma``) stores the norms as (1 + w), as its converter does."""

from __future__ import annotations

from .spec import FamilySpec, LayerParts, activation, uniform_layers

GEGLU = ("gelu_tanh", "gelu")


def gemma_activation(d: dict, source: str, key: str) -> str:
    if d.get(key) == "gelu":  # transformers' GemmaConfig: the released checkpoints' "gelu" is the tanh GELU
        return "gelu_tanh"
    return activation(d, source, key, default="gelu_pytorch_tanh", allowed=GEGLU)


def read_config(d: dict, source: str, n_layers: int) -> dict:
    bias = bool(d.get("attention_bias", False))
    parts = LayerParts(activation=gemma_activation(d, source, "hidden_act"), norm_offset=1.0,
                       embed_scale=float(d["hidden_size"]) ** 0.5)
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=False, parts=parts, sliding_window=None,
                layer_types=uniform_layers(None, n_layers))


SPEC = FamilySpec("gemma", "GemmaForCausalLM", read_config, chat_template="gemma", gguf_arch="gemma")
