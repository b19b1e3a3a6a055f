"""transformers' output classes, filled with the KV cache under the field name the installed transformers
declares: ``past_key_values`` in older releases (5.18 to 5.22 at least), ``cache`` in newer ones (5.25, which
warn that the old name is deprecated whenever it is passed, even as None). The field is read off the class, not
guessed from a version number."""

from __future__ import annotations

from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast


def _cache_field(cls: type) -> str:
    return "cache" if "cache" in cls.__dataclass_fields__ else "past_key_values"


def causal_lm_output(loss, logits, cache) -> CausalLMOutputWithPast:
    return CausalLMOutputWithPast(loss=loss, logits=logits, **{_cache_field(CausalLMOutputWithPast): cache})


def backbone_output(hidden, cache) -> BaseModelOutputWithPast:
    return BaseModelOutputWithPast(last_hidden_state=hidden, **{_cache_field(BaseModelOutputWithPast): cache})
