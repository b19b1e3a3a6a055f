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


GGUF_CONFIG = {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}


def llama_cpp_query_scalar(config: dict, layers_27b: int) -> float:
    """query_pre_attn_scalar, which GGUF does not store, as llama.cpp chooses it: hidden / heads for the 27B
    model (told apart by its layer count), else head_dim."""
    if config["num_hidden_layers"] == layers_27b:
        return config["hidden_size"] / config["num_attention_heads"]
    return config["head_dim"]


def warn_if_llama_cpp_scales_otherwise(cfg, layers_27b: int) -> None:
    """GGUF has no query_pre_attn_scalar: warn when llama.cpp's choice (above) is not this model's."""
    import warnings

    d = {"num_hidden_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
         "num_attention_heads": cfg.num_attention_heads, "head_dim": cfg.head_dim}
    if abs(llama_cpp_query_scalar(d, layers_27b) ** -0.5 - cfg.parts.attn_scale) > 1e-9:
        warnings.warn(f"query_pre_attn_scalar {cfg.parts.attn_scale ** -2:g} is not stored in GGUF and llama.cpp "
                      f"will use {llama_cpp_query_scalar(d, layers_27b):g} for this model", UserWarning, stacklevel=4)


SPEC = FamilySpec("gemma", "GemmaForCausalLM", read_config, chat_template="gemma", gguf_arch="gemma",
                  gguf_reads=True, gguf_config=GGUF_CONFIG, gguf_tokenizer_class="GemmaTokenizerFast")
