"""The text decoder inside an image-text checkpoint: Gemma 3 4B, 12B and 27B (``model_type`` gemma3,
``Gemma3ForConditionalGeneration``), as users find them on the hub (``google/gemma-3-4b-it``, Unsloth's copies).

Such a checkpoint holds a Gemma 3 text decoder beside a vision tower and its projector. For text fine-tuning
pronghorn loads the decoder alone, as Unsloth's text notebooks do:

- config.json's ``text_config`` is the decoder's config. It is sparse on the hub (a few fields; the rest are
  ``Gemma3TextConfig``'s defaults), so transformers' own config class fills it in; the wrapper's token ids
  (``eos_token_id`` [1, 106] in the instruct models) win where the text config names none.
- the tensors are the decoder's under ``language_model.model.`` (the hub's layout) or ``model.language_model.``
  (transformers 5's in memory); the vision tower's and projector's are left out.

A model loaded so is a ``gemma3_text`` model: its adapter and merged exports are the text decoder's
(``Gemma3ForCausalLM``), which transformers loads as such.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CheckpointError, UnsupportedModelError

WRAPPERS = {"gemma3": ("Gemma3TextConfig", "gemma3_text", "Gemma3ForCausalLM")}  # wrapper -> its text decoder
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_HEADS = ("language_model.lm_head.", "lm_head.")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def text_config(d: dict[str, Any], source: str) -> dict[str, Any] | None:
    """The config.json of the text decoder inside ``d`` when ``d`` is an image-text checkpoint's (else None)."""
    if d.get("model_type") not in WRAPPERS:
        return None
    config_class, model_type, architecture = WRAPPERS[d["model_type"]]
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{source}: model_type {d['model_type']!r} without a 'text_config' object")
    import transformers

    given = {k: v for k, v in text.items() if k != "model_type"}
    try:
        full = getattr(transformers, config_class)(**given).to_dict()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: text_config: {e}") from None
    if full.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{source}: text_config: bidirectional attention (an embedding model) is not "
                                    "supported; pronghorn trains causal language models")
    for key in _TOKEN_IDS:
        if text.get(key) is None and d.get(key) is not None:
            full[key] = d[key]
    full.pop("_sliding_window_pattern", None)  # transformers' private copy of layer_types
    full.update(model_type=model_type, architectures=[architecture])
    return full


def text_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder's tensors under the text model's own names (``model.*``, ``lm_head.*``), when
    ``state_dict`` is an image-text checkpoint's; else ``state_dict`` itself."""
    if not any(k.startswith(_TEXT_PREFIXES) for k in state_dict):
        return state_dict
    out = {}
    for key, t in state_dict.items():
        prefix = next((p for p in _TEXT_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            out["model." + key[len(prefix):]] = t
        elif key.startswith(_HEADS):
            out["lm_head." + key.split("lm_head.", 1)[1]] = t
    return out
