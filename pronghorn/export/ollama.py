"""An Ollama ``Modelfile`` for an exported GGUF: FROM, TEMPLATE, PARAMETER stop and SYSTEM.

Ollama speaks Go templates, not Jinja, so the tokenizer's chat template is matched to one of pronghorn's
built-in templates (pronghorn/data/chat_templates.py), each of which has an Ollama twin: a candidate matches
when both render the same text for a handful of probe conversations. The default system prompt (what the
template inserts when a conversation has none, e.g. SmolLM2's) is found by rendering with and without a
system message and becomes the Modelfile's SYSTEM. The model family's own template (its spec's
``chat_template``: Gemma's, Phi-3's, ...) is tried first, and is the Modelfile's when the tokenizer has none.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

from ..data.chat_templates import CHAT_TEMPLATES, ChatTemplate, lookup_chat_template, render_chat

_SENTINEL = "\x01pronghorn-system\x01"
_PROBES = (
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "2+2?"}],
)


def _render(messages, template, tokenizer, add_generation_prompt: bool) -> str | None:
    try:
        return render_chat(messages, template, add_generation_prompt=add_generation_prompt,
                           bos_token=getattr(tokenizer, "bos_token", None) or "",
                           eos_token=getattr(tokenizer, "eos_token", None) or "")
    except Exception:  # a template that refuses a probe (e.g. no system role) just does not match it
        return None


def default_system_prompt(template: str, tokenizer=None) -> str | None:
    """The system prompt ``template`` inserts when a conversation has none (None if it inserts none)."""
    user = [{"role": "user", "content": "Hi there"}]
    with_system = _render([{"role": "system", "content": _SENTINEL}] + user, template, tokenizer, False)
    without = _render(user, template, tokenizer, False)
    if not with_system or without is None or _SENTINEL not in with_system:
        return None
    before, after = with_system.split(_SENTINEL, 1)
    if len(without) > len(before) + len(after) and without.startswith(before) and without.endswith(after):
        return without[len(before): len(without) - len(after)]
    return None


def match_chat_template(template: str | None, tokenizer=None, first: str | None = None) -> ChatTemplate | None:
    """The built-in template (with the right default system prompt) that renders exactly like ``template``;
    ``first``: the name of the one to try first (the model family's)."""
    if not template:
        return None
    system = default_system_prompt(template, tokenizer)
    preferred = lookup_chat_template(first).name if first else None
    # the family's template first, then those with the same default system prompt
    for builtin in sorted(CHAT_TEMPLATES.values(), key=lambda t: (t.name != preferred, t.default_system != system)):
        candidate = builtin if builtin.default_system == system else builtin.with_system(system)
        same = True
        for messages in _PROBES:
            for gen in (True, False):
                ours = _render(messages, template, tokenizer, gen)
                if ours is not None and ours != _render(messages, candidate, tokenizer, gen):
                    same = False
        if same and _render(_PROBES[0], template, tokenizer, True) is not None:
            return candidate
    return None


def ollama_modelfile(gguf_file: str, tokenizer, family_template: str | None = None) -> str:
    """Modelfile text for ``ollama create -f Modelfile`` with the GGUF ``gguf_file`` beside it.
    ``family_template``: the model family's chat template name (``FamilySpec.chat_template``), tried first and
    used when the tokenizer has no chat template."""
    template = getattr(tokenizer, "chat_template", None)
    template = template.get("default") if isinstance(template, dict) else template
    match = match_chat_template(template, tokenizer, first=family_template)
    if match is None and not template and family_template:
        match = lookup_chat_template(family_template)
        warnings.warn(f"the tokenizer has no chat template, so the Modelfile uses the model family's "
                      f"({match.name!r}); set one with get_chat_template(tokenizer, ...) if it was trained on "
                      "another format", UserWarning, stacklevel=2)
    eos = getattr(tokenizer, "eos_token", None)
    if match is None:
        if template:
            warnings.warn("the tokenizer's chat template matches none of pronghorn's built-in templates, so the "
                          "Modelfile has no TEMPLATE (Ollama then uses the GGUF's tokenizer.chat_template if it "
                          "recognises it); use get_chat_template(tokenizer, ...) before training to get one",
                          UserWarning, stacklevel=3)
        lines = [f"FROM ./{gguf_file}"] + ([f"PARAMETER stop {json.dumps(eos)}"] if eos else [])
        return "\n".join(lines) + "\n"
    stops = tuple(match.stop) + ((eos,) if eos and eos not in match.stop else ())
    return replace(match, stop=stops).ollama_modelfile(f"./{gguf_file}")
