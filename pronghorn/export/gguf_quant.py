"""GGUF quantization methods: which GGML type each tensor gets, and the bytes for it.

Rules (as llama.cpp's converter and ``llama-quantize`` apply them, simplified where noted):
- 1-D tensors (norms, biases) and ``rope_freqs`` stay F32 for every method.
- ``f32`` / ``f16`` / ``bf16`` / ``q8_0`` / ``q4_0`` / ``q5_0`` / ``q4_k`` / ``q6_k``: every 2-D weight gets that type.
- ``q4_k_m``: Q4_K, except Q6_K for the output matrix (``output.weight``, or ``token_embd.weight`` when the
  embeddings are tied), and for ``attn_v`` and ``ffn_down`` in the first 1/8 of the layers, the last 1/8, and
  every third layer between (llama.cpp's ``use_more_bits``). llama.cpp's extra tweaks for
  grouped-query/MoE models are not applied.
- A row (the input dimension) that is not a multiple of the type's block size falls back as llama.cpp does:
  Q4_K -> Q5_0, Q6_K -> Q8_0 (256-value k-quant blocks), and to F16 when even the 32-value block does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PronghornError
from .kquants import quantize_q4_k, quantize_q6_k


@dataclass(frozen=True)
class Method:
    name: str  # canonical, lower case: used in file names upper-cased (model.Q8_0.gguf)
    default: str  # GGML type name of ordinary 2-D weights
    file_type: str  # gguf.LlamaFileType member


METHODS = {
    m.name: m
    for m in (
        Method("f32", "F32", "ALL_F32"),
        Method("f16", "F16", "MOSTLY_F16"),
        Method("bf16", "BF16", "MOSTLY_BF16"),
        Method("q8_0", "Q8_0", "MOSTLY_Q8_0"),
        Method("q5_0", "Q5_0", "MOSTLY_Q5_0"),
        Method("q4_0", "Q4_0", "MOSTLY_Q4_0"),
        Method("q6_k", "Q6_K", "MOSTLY_Q6_K"),
        Method("q4_k", "Q4_K", "MOSTLY_Q4_K_S"),
        Method("q4_k_m", "Q4_K", "MOSTLY_Q4_K_M"),
    )
}
# Unsloth's names for the common choices
ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m", "float16": "f16",
           "bfloat16": "bf16", "float32": "f32"}

_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
_BLOCK = {"Q8_0": 32, "Q5_0": 32, "Q4_0": 32, "Q4_K": 256, "Q6_K": 256, "F16": 1, "BF16": 1, "F32": 1}


def resolve_methods(methods: str | list[str] | tuple[str, ...]) -> list[Method]:
    """The :class:`Method` for each name (case-insensitive, Unsloth aliases accepted), in order, deduplicated."""
    names = [methods] if isinstance(methods, str) else list(methods)
    if not names:
        raise PronghornError("quantization_method is empty; choose one or more of " + ", ".join(METHODS))
    out: list[Method] = []
    for name in names:
        key = str(name).strip().lower().replace("-", "_")
        key = ALIASES.get(key, key)
        if key not in METHODS:
            raise PronghornError(f"unknown GGUF quantization method {name!r}; choose among "
                                 f"{', '.join(METHODS)} (or {', '.join(ALIASES)})")
        if METHODS[key] not in out:
            out.append(METHODS[key])
    return out


def _more_bits(layer: int, n_layers: int) -> bool:
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(method: Method, gguf_name: str, shape: tuple[int, ...], n_layers: int, has_output: bool) -> str:
    """GGML type name for the tensor ``gguf_name`` of numpy ``shape`` [out, in] under ``method``."""
    if len(shape) < 2 or gguf_name == "rope_freqs.weight":
        return "F32"
    kind = method.default
    if method.name == "q4_k_m":
        parts = gguf_name.split(".")
        if gguf_name == "output.weight" or (gguf_name == "token_embd.weight" and not has_output):
            kind = "Q6_K"
        elif parts[0] == "blk" and parts[2] in ("attn_v", "ffn_down") and _more_bits(int(parts[1]), n_layers):
            kind = "Q6_K"
    row = shape[-1]
    if row % _BLOCK[kind]:
        kind = _FALLBACK.get(kind, kind)
    if row % _BLOCK[kind]:
        kind = "F16"
    return kind


def encode(array: np.ndarray, kind: str) -> np.ndarray:
    """``array`` (float32, [out, in]) as the raw data of GGML type ``kind`` (a float array or uint8 bytes)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    array = np.ascontiguousarray(array, dtype=np.float32)
    if kind == "F32":
        return array
    if kind == "F16":
        return array.astype(np.float16)
    if kind == "Q4_K":
        return quantize_q4_k(array)
    if kind == "Q6_K":
        return quantize_q6_k(array)
    return quantize(array, GGMLQuantizationType[kind])
