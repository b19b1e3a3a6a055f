"""Llama 2 / 3.x and SmolLM2 (``model_type`` llama): the base every other family's parts default to."""

from __future__ import annotations

from .spec import FamilySpec, LayerParts, activation, uniform_layers


def read_config(d: dict, source: str, n_layers: int) -> dict:
    bias = bool(d.get("attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(d.get("mlp_bias", False)),
                parts=LayerParts(activation=activation(d, source)),
                sliding_window=None, layer_types=uniform_layers(None, n_layers))


SPEC = FamilySpec("llama", "LlamaForCausalLM", read_config, chat_template="llama-3.1",
                  gguf_arch="llama", gguf_reads=True, gguf_permute_qk=True)
