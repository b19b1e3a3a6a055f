"""Qwen2 / Qwen2.5 (``model_type`` qwen2): Llama's parts with q/k/v biases; sliding window on the layers from
``max_window_layers`` on when ``use_sliding_window`` is set."""

from __future__ import annotations

from .spec import FamilySpec, LayerParts, activation


def qwen_layer_types(d: dict, n_layers: int) -> tuple[int | None, list[str]]:
    """(window, per-layer attention kind) with Qwen2/3's semantics (``layer_types`` wins when given)."""
    window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
    types = d.get("layer_types") or [
        "sliding_attention" if window is not None and i >= d.get("max_window_layers", 28) else "full_attention"
        for i in range(n_layers)
    ]
    return window, list(types)


def read_config(d: dict, source: str, n_layers: int) -> dict:
    window, types = qwen_layer_types(d, n_layers)
    return dict(qkv_bias=True, o_bias=False, mlp_bias=False, parts=LayerParts(activation=activation(d, source)),
                sliding_window=window, layer_types=types)


SPEC = FamilySpec("qwen2", "Qwen2ForCausalLM", read_config, chat_template="qwen-2.5", gguf_arch="qwen2",
                  gguf_reads=True, gguf_config={"attention_bias": True, "use_sliding_window": False})
