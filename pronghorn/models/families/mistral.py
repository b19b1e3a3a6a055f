"""Mistral 7B, Mistral Nemo / Small (``model_type`` mistral): Llama's parts, no biases, an optional sliding
window on every layer, and ``head_dim`` that need not be hidden / heads (Nemo). GGUF: llama.cpp's ``llama``."""

from __future__ import annotations

from .spec import FamilySpec, LayerParts, activation, uniform_layers


def read_config(d: dict, source: str, n_layers: int) -> dict:
    window = d.get("sliding_window")
    return dict(qkv_bias=False, o_bias=False, mlp_bias=False, parts=LayerParts(activation=activation(d, source)),
                sliding_window=window, layer_types=uniform_layers(window, n_layers))


SPEC = FamilySpec("mistral", "MistralForCausalLM", read_config, chat_template="mistral",
                  gguf_arch="llama", gguf_permute_qk=True)
