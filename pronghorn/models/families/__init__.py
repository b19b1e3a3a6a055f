"""The model families pronghorn implements, one spec module each (``spec.py`` says what a spec holds).

Adding a family is one module here plus its entry in ``FAMILIES``, and its tiny test configs.
"""

from __future__ import annotations

from . import gemma, gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3
from .spec import GGUF_GLOBALS, FamilySpec, Fusion, LayerParts

FAMILIES: dict[str, FamilySpec] = {m.SPEC.model_type: m.SPEC for m in (llama, mistral, qwen2, qwen3, gemma, gemma2,
                                                                         gemma3_text, phi3)}

__all__ = ["FAMILIES", "GGUF_GLOBALS", "FamilySpec", "Fusion", "LayerParts", "family"]


def family(model_type: str) -> FamilySpec:
    """The spec of a supported ``model_type`` (KeyError otherwise; ModelConfig gives the user-facing error)."""
    return FAMILIES[model_type]
