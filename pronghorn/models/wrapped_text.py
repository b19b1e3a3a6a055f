"""The text decoder inside an image-text checkpoint: Gemma 3 4B, 12B and 27B (``model_type`` gemma3,
``Gemma3ForConditionalGeneration``) and Mistral Small 3.1 / 3.2 (``mistral3``), as users find them on the hub
(``google/gemma-3-4b-it``, ``mistralai/Mistral-Small-3.2-24B-Instruct-2506``, Unsloth's copies).

Such a checkpoint holds a text decoder of a supported family beside a vision tower and its projector. For text
fine-tuning pronghorn loads the decoder alone, as Unsloth's text notebooks do:

- config.json's ``text_config`` is the decoder's config. It is sparse on the hub (Gemma 3 4B: a few fields; the
  rest are ``Gemma3TextConfig``'s defaults), so transformers' own config class fills it in; the wrapper's token
  ids (``eos_token_id`` [1, 106] in Gemma 3's instruct models) win where the text config names none, and its
  ``tie_word_embeddings`` wins, as transformers ties the image-text model's head by it.
- the tensors are the decoder's under ``language_model.model.`` (the hub's layout) or ``model.language_model.``
  (transformers 5's in memory); the vision tower's and projector's are left out.

A model loaded so is a text model of its family (``gemma3_text``, ``mistral``) that remembers its wrapper
(``ModelConfig.wrapper``):

- its merged exports are the text decoder's (``Gemma3ForCausalLM``, ``MistralForCausalLM``), which transformers
  loads as such;
- its adapters are the wrapper's, as PEFT loads them on the image-text base their config names: keys under the
  wrapper's module names (``model.language_model.layers.0...``) and ``target_modules`` a regex that PEFT matches
  against the language model's projections alone (a list of names would also put adapters on the vision tower's
  ``q_proj``... with none of the file's weights in them). Such adapters load back here, as do PEFT's own.
"""

from __future__ import annotations

from typing import Any

import re

import torch

from ..errors import CheckpointError, UnsupportedModelError

# wrapper -> (its text decoder's config class, model_type and architecture, the decoder's module prefix in it)
WRAPPERS = {"gemma3": ("Gemma3TextConfig", "gemma3_text", "Gemma3ForCausalLM", "model.language_model."),
            "mistral3": ("MistralConfig", "mistral", "MistralForCausalLM", "model.language_model.")}
_ADAPTER = "base_model.model."  # PEFT's prefix of a module name in an adapter file
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_HEADS = ("language_model.lm_head.", "lm_head.")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def text_config(d: dict[str, Any], source: str) -> dict[str, Any] | None:
    """The config.json of the text decoder inside ``d`` when ``d`` is an image-text checkpoint's (else None)."""
    if d.get("model_type") not in WRAPPERS:
        return None
    config_class, model_type, architecture, _ = WRAPPERS[d["model_type"]]
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
    if "tie_word_embeddings" in d:  # transformers ties the image-text model's head by the wrapper's own flag
        full["tie_word_embeddings"] = bool(d["tie_word_embeddings"])
    full.pop("_sliding_window_pattern", None)  # transformers' private copy of layer_types
    full.update(model_type=model_type, architectures=[architecture])
    return full


def wrapper_name(wrapper: str, name: str) -> str:
    """The wrapper's name of the text model's module ``name`` (``model.layers.0.mlp`` ->
    ``model.language_model.layers.0.mlp``; the head keeps its name)."""
    return WRAPPERS[wrapper][3] + name[len("model."):] if name.startswith("model.") else name


def adapter_to_wrapper(wrapper: str, tensors: dict, targets: list[str]) -> tuple[dict, str]:
    """An adapter of the text model as the wrapper's: its tensors under the wrapper's names, and its
    ``target_modules`` as a regex matching those projections inside the language model only."""
    out = {_ADAPTER + wrapper_name(wrapper, k[len(_ADAPTER):]): v for k, v in tensors.items()}
    prefix = re.escape(WRAPPERS[wrapper][3])
    return out, rf"{prefix}layers\.\d+\.(?:self_attn|mlp)\.(?:{'|'.join(targets)})"


def adapter_from_wrapper(wrapper: str | None, tensors: dict) -> dict:
    """An adapter file's tensors under the text model's names: those saved on the wrapper renamed."""
    if wrapper is None:
        return tensors
    inner = _ADAPTER + WRAPPERS[wrapper][3]
    return {(_ADAPTER + "model." + k[len(inner):] if k.startswith(inner) else k): v for k, v in tensors.items()}


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
