"""Named built-in chat templates, sandboxed rendering, and Unsloth's notebook helpers.

- :func:`get_chat_template` (Unsloth's signature) puts one of our built-in templates on a tokenizer and makes
  sure its end-of-turn marker is a special token and the tokenizer's EOS, so the model learns to stop.
- :func:`render_chat` renders a conversation in jinja2's ``ImmutableSandboxedEnvironment`` (the same kind of
  environment ``transformers``' ``apply_chat_template`` uses), so a hostile template cannot reach Python
  internals.
- :func:`train_on_responses_only` (Unsloth's signature) masks tokenized rows to the text after each
  ``response_part``, found by a *character* search in the decoded text and mapped back to tokens.
- :func:`show_masked_sample` shows a row with its masked text wrapped in ``[[...]]``.

The templates are written from each family's published prompt format; Gemma's and Phi's render exactly what
those models' own ``tokenizer_config.json`` templates render (tests/data/test_family_templates.py). Each comes with its Ollama ``TEMPLATE``
twin (Go template syntax over ``.System`` / ``.Messages``) and the Ollama ``stop`` parameters.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import DataError
from ..kernels import IGNORE_INDEX

__all__ = [
    "CHAT_TEMPLATES",
    "ChatTemplate",
    "get_chat_template",
    "list_chat_templates",
    "lookup_chat_template",
    "render_chat",
    "show_masked_sample",
    "train_on_responses_only",
]

_SYSTEM_LINE = "{%- set default_system = "  # first line of every built-in template (see ChatTemplate.with_system)


@dataclass(frozen=True)
class ChatTemplate:
    """One built-in chat format.

    ``jinja``: the Hugging Face chat template (``messages``, ``add_generation_prompt``; ``bos_token`` /
    ``eos_token`` where the format uses the tokenizer's own). ``eos_token``: the end-of-turn string generation
    should stop on (``None``: the tokenizer's own EOS). ``stop``: Ollama ``PARAMETER stop`` values.
    ``ollama_template``: the Ollama Modelfile ``TEMPLATE`` (Go template). ``default_system``: the system
    prompt used when a conversation has none (Ollama: the Modelfile ``SYSTEM``). ``instruction_part`` /
    ``response_part``: the strings that open a user turn / an assistant reply, for
    :func:`train_on_responses_only`. ``special_tokens``: the turn markers the format renders, each one special
    token of the models made for it (what ``get_chat_template(..., model=)`` adds to a base that lacks them).
    """

    name: str
    jinja: str
    eos_token: str | None
    stop: tuple[str, ...]
    ollama_template: str
    default_system: str | None = None
    instruction_part: str = ""
    response_part: str = ""
    special_tokens: tuple[str, ...] = ()  # markers the format renders as single special tokens

    def with_system(self, system_message: str | None) -> "ChatTemplate":
        """This template with ``system_message`` as its default system prompt (``None``: no default)."""
        first, rest = self.jinja.split("\n", 1)
        assert first.startswith(_SYSTEM_LINE)
        return replace(self, jinja=_system_line(system_message) + "\n" + rest, default_system=system_message)

    def ollama_modelfile(self, base: str) -> str:
        """A Modelfile for ``ollama create``: ``FROM base``, the TEMPLATE, stop parameters and SYSTEM."""
        lines = [f"FROM {base}", f'TEMPLATE """{self.ollama_template}"""']
        lines += [f"PARAMETER stop {json.dumps(s)}" for s in self.stop]
        if self.default_system:
            lines.append(f'SYSTEM """{self.default_system}"""')
        return "\n".join(lines) + "\n"


def _system_line(default: str | None) -> str:
    return _SYSTEM_LINE + ("none" if default is None else json.dumps(default)) + " -%}"


# Shared preamble: split off a leading system message, else use the default one.
_SPLIT_SYSTEM = (
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set system = messages[0].content -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = default_system -%}{%- set loop_messages = messages -%}{%- endif -%}\n"
)
_ALTERNATE = (
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) or message.role not in ('user', 'assistant') -%}"
    "{{ raise_exception('after an optional system message, roles must alternate user/assistant/user/...') }}"
    "{%- endif -%}\n"
)
_USER_ASSISTANT = (
    "{%- if message.role not in ('user', 'assistant') -%}"
    "{{ raise_exception('this template supports only system (first), user and assistant messages, got ' + "
    "message.role) }}{%- endif -%}\n"
)


def _chatml_jinja(default: str | None, sep: str = "\\n", end: str = "<|im_end|>\\n", only_roles: bool = False) -> str:
    """ChatML: <|im_start|>{role}{sep}{content}{end}; Phi-4 (microsoft/phi-4) is ChatML with ``sep``
    <|im_sep|>, ``end`` <|im_end|> and only the system, user and assistant roles (``only_roles``)."""
    role_check = "{%- if message.role in ('system', 'user', 'assistant') -%}" if only_roles else "{%- if true -%}"
    return (
        _system_line(default) + "\n"
        "{%- if default_system is not none and not (messages and messages[0].role == 'system') -%}"
        "{{ '<|im_start|>system" + sep + "' + default_system + '" + end + "' }}{%- endif -%}\n"
        "{%- for message in messages -%}" + role_check
        + "{{ '<|im_start|>' + message.role + '" + sep + "' + message.content + '" + end + "' }}{%- endif -%}"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant" + sep + "' }}{%- endif -%}"
    )


def _llama3_jinja(default: str | None, dated: bool) -> str:
    if dated:  # Llama 3.1: the system block is always there, opening with the knowledge / today dates
        system = (
            "{%- if date_string is not defined -%}{%- set date_string = '26 Jul 2024' -%}{%- endif -%}\n"
            "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n"
            "Today Date: ' + date_string + '\\n\\n' + (system or '') + '<|eot_id|>' }}\n"
        )
    else:
        system = (
            "{%- if system is not none -%}"
            "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}{%- endif -%}\n"
        )
    return (
        _system_line(default) + "\n" + _SPLIT_SYSTEM + "{{ bos_token or '' }}\n" + system
        + "{%- for message in loop_messages -%}\n" + _USER_ASSISTANT
        + "{{ '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    )


def _mistral_jinja(default: str | None) -> str:
    # <s>[INST] {system}\n\n{user} [/INST] {assistant}</s>[INST] {user} [/INST]
    return (
        _system_line(default) + "\n" + _SPLIT_SYSTEM + "{{ bos_token or '' }}\n"
        "{%- for message in loop_messages -%}\n" + _ALTERNATE
        + "{%- if message.role == 'user' -%}"
        "{{ '[INST] ' + (system + '\\n\\n' if loop.first and system else '') + message.content + ' [/INST]' }}"
        "{%- else -%}{{ ' ' + message.content + '</s>' }}{%- endif -%}"
        "{%- endfor -%}"
    )


def _alpaca_jinja(default: str | None) -> str:
    return (
        _system_line(default) + "\n" + _SPLIT_SYSTEM + "{{ (bos_token or '') + (system or '') }}\n"
        "{%- for message in loop_messages -%}\n" + _ALTERNATE
        + "{%- if message.role == 'user' -%}{{ '\\n\\n### Instruction:\\n' + message.content }}"
        "{%- else -%}{{ '\\n\\n### Response:\\n' + message.content + (eos_token or '') }}{%- endif -%}"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ '\\n\\n### Response:\\n' }}{%- endif -%}"
    )


def _tagged_jinja(default: str | None, end: str) -> str:
    """Zephyr: <|system|>\\n...{end}\\n<|user|>\\n...{end}\\n<|assistant|>\\n...{end}\\n."""
    return (
        _system_line(default) + "\n" + _SPLIT_SYSTEM
        + "{%- if system is not none -%}{{ '<|system|>\\n' + system + '" + end + "\\n' }}{%- endif -%}\n"
        "{%- for message in loop_messages -%}\n" + _USER_ASSISTANT
        + "{{ '<|' + message.role + '|>\\n' + message.content + '" + end + "\\n' }}"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
    )


# -- Gemma and Phi: each renders exactly what the model's own tokenizer_config.json template renders -------


def _gemma_jinja(default: str | None) -> str:
    """Gemma 3's template (google/gemma-3-*-it, text parts): <start_of_turn>user|model\\n{content | trim}
    <end_of_turn>\\n, a system message folded into the first user turn as "{system}\\n\\n". Gemma 1 and 2's
    own template (google/gemma-2-2b-it) renders the same text for every conversation it accepts; it refuses a
    system message, which this one folds as Gemma 3's does."""
    return (
        _system_line(default) + "\n{{ bos_token }}\n"
        "{%- if messages and messages[0].role == 'system' -%}{%- set prefix = messages[0].content + '\\n\\n' -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set prefix = default_system + '\\n\\n' if default_system is not none else '' -%}"
        "{%- set loop_messages = messages -%}{%- endif -%}\n"
        "{%- for message in loop_messages -%}\n" + _ALTERNATE
        + "{{ '<start_of_turn>' + ('model' if message.role == 'assistant' else 'user') + '\\n'"
        " + (prefix if loop.first else '') + message.content | trim + '<end_of_turn>\\n' }}"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
    )


def _phi_jinja(default: str | None, newline: bool) -> str:
    """Phi-3 / 3.5 (``newline``; microsoft/Phi-3.5-mini-instruct: <|role|>\\n{content}<|end|>\\n, an empty system
    message left out) and Phi-4-mini (microsoft/Phi-4-mini-instruct: <|role|>{content}<|end|>, a system
    message's ``tools`` in <|tool|>...<|/tool|>). Both end a conversation without a generation prompt with
    ``eos_token``; other roles are left out, as there."""
    nl = "\\n" if newline else ""
    if newline:
        system = ("{%- if message.role == 'system' and message.content -%}"
                  "{{ '<|system|>\\n' + message.content + '<|end|>\\n' }}")
        turn = "{%- elif message.role in ('user', 'assistant') -%}"
    else:
        system = ("{%- if message.role == 'system' and 'tools' in message and message.tools is not none -%}"
                  "{{ '<|system|>' + message.content + '<|tool|>' + message.tools + '<|/tool|><|end|>' }}")
        turn = "{%- else -%}"
    return (
        _system_line(default) + "\n"
        "{%- if default_system is not none and not (messages and messages[0].role == 'system') -%}"
        "{{ '<|system|>" + nl + "' + default_system + '<|end|>" + nl + "' }}{%- endif -%}\n"
        "{%- for message in messages -%}" + system + turn
        + "{{ '<|' + message.role + '|>" + nl + "' + message.content + '<|end|>" + nl + "' }}{%- endif -%}"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>" + nl + "' }}{%- else -%}{{ eos_token }}{%- endif -%}"
    )


# Ollama twins. Ollama collects system messages into .System (also kept in .Messages) and puts the Modelfile
# SYSTEM in as a system message when the conversation has none.
_OLLAMA_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
_OLLAMA_LLAMA3 = (
    "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{- range .Messages }}{{ if ne .Role \"system\" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
_OLLAMA_LLAMA31 = (
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n{{ if .System }}{{ .System }}{{ end }}<|eot_id|>"
    "{{- range .Messages }}{{ if ne .Role \"system\" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
_OLLAMA_MISTRAL = (
    "{{- $system := .System }}{{ range .Messages }}{{ if eq .Role \"user\" }}[INST] "
    "{{ if $system }}{{ $system }}\n\n{{ $system = \"\" }}{{ end }}{{ .Content }} [/INST]"
    "{{ else if eq .Role \"assistant\" }} {{ .Content }}</s>{{ end }}{{ end }}"
)
_OLLAMA_ALPACA = (
    "{{ if .System }}{{ .System }}{{ end }}{{ range .Messages }}{{ if eq .Role \"user\" }}\n\n### Instruction:\n"
    "{{ .Content }}{{ else if eq .Role \"assistant\" }}\n\n### Response:\n{{ .Content }}{{ end }}{{ end }}"
    "\n\n### Response:\n"
)


def _ollama_tagged(end: str, nl: str = "\n") -> str:
    return "{{- range .Messages }}<|{{ .Role }}|>" + nl + "{{ .Content }}" + end + nl + "{{ end }}<|assistant|>" + nl


_OLLAMA_PHI4 = ("{{- range .Messages }}<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}<|im_end|>{{ end }}"
                "<|im_start|>assistant<|im_sep|>")


_OLLAMA_GEMMA = (
    "{{- $system := .System }}{{ range .Messages }}{{ if eq .Role \"user\" }}<start_of_turn>user\n"
    "{{ if $system }}{{ $system }}\n\n{{ $system = \"\" }}{{ end }}{{ .Content }}<end_of_turn>\n"
    "{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}"
    "<start_of_turn>model\n"
)

_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_L3_USER, _L3_ASSISTANT = "<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"
_L3_STOP = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
_PHI_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
_PHI_STOP = ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>")

CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate("chatml", _chatml_jinja(None), "<|im_end|>", ("<|im_start|>", "<|im_end|>"), _OLLAMA_CHATML,
                     None, "<|im_start|>user\n", "<|im_start|>assistant\n", _CHATML_TOKENS),
        ChatTemplate("llama-3", _llama3_jinja(None, dated=False), "<|eot_id|>", _L3_STOP, _OLLAMA_LLAMA3,
                     None, _L3_USER, _L3_ASSISTANT, _L3_STOP),
        ChatTemplate("llama-3.1", _llama3_jinja(None, dated=True), "<|eot_id|>", _L3_STOP + ("<|eom_id|>",),
                     _OLLAMA_LLAMA31, None, _L3_USER, _L3_ASSISTANT, _L3_STOP),
        ChatTemplate("mistral", _mistral_jinja(None), "</s>", ("[INST]", "[/INST]", "</s>"), _OLLAMA_MISTRAL,
                     None, "[INST]", "[/INST]"),
        ChatTemplate("alpaca", _alpaca_jinja(_ALPACA_SYSTEM), None, ("### Instruction:", "### Response:"),
                     _OLLAMA_ALPACA, _ALPACA_SYSTEM, "\n\n### Instruction:\n", "\n\n### Response:\n"),
        ChatTemplate("zephyr", _tagged_jinja(None, "</s>"), "</s>", ("<|system|>", "<|user|>", "<|assistant|>", "</s>"),
                     _ollama_tagged("</s>"), None, "<|user|>\n", "<|assistant|>\n"),
        ChatTemplate("qwen-2.5", _chatml_jinja(_QWEN_SYSTEM), "<|im_end|>", ("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
                     _OLLAMA_CHATML, _QWEN_SYSTEM, "<|im_start|>user\n", "<|im_start|>assistant\n", _CHATML_TOKENS),
        ChatTemplate("phi-3", _phi_jinja(None, newline=True), "<|end|>", _PHI_STOP, _ollama_tagged("<|end|>"),
                     None, "<|user|>\n", "<|assistant|>\n", _PHI_TOKENS),
        ChatTemplate("phi-4-mini", _phi_jinja(None, newline=False), "<|end|>", _PHI_STOP,
                     _ollama_tagged("<|end|>", nl=""), None, "<|user|>", "<|assistant|>", _PHI_TOKENS),
        ChatTemplate("phi-4", _chatml_jinja(None, "<|im_sep|>", "<|im_end|>", only_roles=True), "<|im_end|>",
                     ("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
                     _OLLAMA_PHI4, None, "<|im_start|>user<|im_sep|>", "<|im_start|>assistant<|im_sep|>",
                     ("<|im_start|>", "<|im_sep|>", "<|im_end|>")),
        ChatTemplate("gemma", _gemma_jinja(None), "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>"), _OLLAMA_GEMMA,
                     None, "<start_of_turn>user\n", "<start_of_turn>model\n", ("<start_of_turn>", "<end_of_turn>")),
    )
}

_ALIASES = {
    "llama3": "llama-3", "llama-31": "llama-3.1", "llama3.1": "llama-3.1", "qwen2.5": "qwen-2.5", "qwen-25": "qwen-2.5",
    "qwen25": "qwen-2.5", "phi3": "phi-3", "phi-3.5": "phi-3", "phi-35": "phi-3", "phi3.5": "phi-3",
    "phi4": "phi-4", "phi4-mini": "phi-4-mini", "gemma2": "gemma", "gemma-2": "gemma", "gemma3": "gemma",
    "gemma-3": "gemma", "mistral-instruct": "mistral",
}


def list_chat_templates() -> list[str]:
    """Names of the built-in chat templates."""
    return list(CHAT_TEMPLATES)


def lookup_chat_template(name: str | ChatTemplate) -> ChatTemplate:
    """The built-in template called ``name`` (Unsloth's names and spellings: "phi-3.5", "gemma2", "Llama_3.1",
    ...); ``ValueError`` listing the built-in ones for an unknown name."""
    if isinstance(name, ChatTemplate):
        return name
    if not isinstance(name, str):
        raise TypeError(f"chat_template must be a template name or a ChatTemplate, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; the built-in ones are: {', '.join(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[key]


def get_chat_template(
    tokenizer: Any,
    chat_template: str | ChatTemplate = "chatml",
    map_eos_token: bool = True,
    system_message: str | None = None,
    model: Any = None,
) -> Any:
    """Set a built-in chat template on ``tokenizer`` (in place) and return it, as Unsloth's helper does.

    ``system_message`` replaces the template's default system prompt (used when a conversation has none).
    With ``map_eos_token``, the template's end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``, ...) is made a
    special token of the tokenizer -- added if missing, with a warning that the model's embedding must be
    resized to ``len(tokenizer)`` (nothing is resized here) -- and becomes ``tokenizer.eos_token``, so training
    data end each reply with it and generation stops on it. Raises ``ValueError`` for an unknown name (listing
    the built-in ones) and when the marker cannot be made a single token.

    ``model``: the format's turn markers the tokenizer lacks (``<|im_start|>`` on a Llama 2 base, ...) are added
    as special tokens with :func:`~pronghorn.models.vocab.add_new_tokens`: the embedding and head grow (new rows
    the mean of the others) and then train fully beside the adapters, so the model can learn them.
    """
    t = lookup_chat_template(chat_template)
    if system_message is not None:
        t = t.with_system(system_message)
    if model is not None:
        vocab = tokenizer.get_vocab()
        missing = [m for m in t.special_tokens if m not in vocab]
        if missing:
            from ..models.vocab import add_new_tokens

            add_new_tokens(model, tokenizer, missing, special=True)
            print(f"pronghorn: the {t.name} template's markers {missing} were not in the vocabulary: added as special "
                  "tokens; the embedding and head grow and train fully", flush=True)
    if map_eos_token and t.eos_token is not None:
        _ensure_special_token(tokenizer, t.eos_token, t.name)
        tokenizer.eos_token = t.eos_token
    tokenizer.chat_template = t.jinja
    return tokenizer


def _ensure_special_token(tokenizer: Any, token: str, name: str) -> None:
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    specials |= {str(a) for a in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()
                 if getattr(a, "special", False)}
    if token not in specials:
        if not hasattr(tokenizer, "add_tokens"):
            raise ValueError(
                f"the {name} template ends turns with {token!r}, which {type(tokenizer).__name__} does not have, "
                "and this tokenizer cannot add special tokens; use a Hugging Face tokenizer or map_eos_token=False"
            )
        before = len(tokenizer)
        from tokenizers import AddedToken

        # add_tokens(special_tokens=True) keeps the same meaning across transformers 4.x and 5.x
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
        if len(tokenizer) > before:
            warnings.warn(
                f"get_chat_template({name!r}) added the special token {token!r} to the tokenizer (vocabulary "
                f"{before} -> {len(tokenizer)}); the model's embedding and LM head must grow to match "
                "(model.resize_token_embeddings(len(tokenizer))) and be trained",
                UserWarning,
                stacklevel=3,
            )
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"the {name} template's end-of-turn marker {token!r} does not encode to a single token with this "
            f"tokenizer (got {len(ids)} ids), so the model could not learn to stop on it"
        )


# -- sandboxed rendering ---------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """An immutable sandbox in which touching an unsafe attribute raises at once (jinja2's own returns an
    undefined value that raises only when used further, so ``{{ f.__globals__ }}`` would print nothing)."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat(messages: Sequence[Mapping[str, Any]], template: str | ChatTemplate, **kwargs: Any) -> str:
    """Render ``messages`` with a chat template (Jinja source, a built-in name or a :class:`ChatTemplate`).

    Rendering runs in jinja2's ``ImmutableSandboxedEnvironment`` (``trim_blocks``, ``lstrip_blocks``,
    ``raise_exception``, ``tojson``, ``strftime_now``), so attribute access to Python internals raises
    ``jinja2.exceptions.SecurityError``. ``kwargs`` become template variables (``add_generation_prompt``,
    ``bos_token``, ``eos_token``, ``tools``, ``date_string``, ...); ``add_generation_prompt`` defaults to False.
    """
    if isinstance(template, ChatTemplate):
        template = template.jinja
    elif isinstance(template, str) and "{" not in template:
        template = lookup_chat_template(template).jinja
    kwargs.setdefault("add_generation_prompt", False)
    return _compile(template).render(messages=list(messages), **kwargs)


# -- train_on_responses_only / show_masked_sample --------------------------------------------------------


def _decode_with_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of ``ids`` and each token's character span in it."""
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:  # the usual case: the text re-encodes to the same tokens
            return text, [tuple(o) for o in enc["offset_mapping"]]
    # otherwise: where each token ends is the length of the decoded prefix (quadratic, but only a fallback)
    offsets, prev = [], 0
    for k in range(len(ids)):
        end = len(tokenizer.decode(ids[: k + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        end = max(prev, min(end, len(text)))
        offsets.append((prev, end))
        prev = end
    return text, offsets


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (its list plus added tokens marked special)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tok_id, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            ids.add(tok_id)
    return ids


def _find_all(text: str, part: str) -> list[int]:
    out, i = [], text.find(part)
    while i >= 0:
        out.append(i)
        i = text.find(part, i + len(part))
    return out


def _response_labels(
    row: Mapping[str, Any], index: int, tokenizer: Any, instruction_part: str, response_part: str,
    last_response_only: bool, specials: set[int],
) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = [int(i) for i in row["input_ids"]]
    attention = row.get("attention_mask")
    n_real = len(ids) if attention is None else sum(1 for a in attention if a)
    text, offsets = _decode_with_offsets(tokenizer, ids)
    starts = _find_all(text, response_part)
    if not starts:
        raise DataError(
            f"row {index}: response_part {response_part!r} does not occur in the decoded text "
            f"(which begins {text[:80]!r}); check response_part against the chat template"
        )
    instructions = _find_all(text, instruction_part) if instruction_part else []
    spans = []
    for s in starts:
        begin = s + len(response_part)
        end = next((i for i in instructions if i >= begin), len(text))
        spans.append((begin, end))
    if last_response_only:
        spans = spans[-1:]
    labels = [IGNORE_INDEX] * len(ids)
    for begin, end in spans:
        toks = [t for t in range(min(len(ids), n_real)) if begin <= offsets[t][0] < end or
                (offsets[t][0] == offsets[t][1] == begin)]
        # as in tokenize_record: train up to and including the span's last special token (its end-of-turn
        # marker); the template's trailing newline stays masked, and so does the EOS that closes a conversation
        # after the last turn's marker (Phi-3.5 / Phi-4-mini: <|end|>\n<|endoftext|>)
        marks = [t for t in toks if ids[t] in specials]
        if (len(marks) > 1 and marks[-1] == n_real - 1 and ids[marks[-1]] == eos
                and not text[offsets[marks[-2]][1]:offsets[marks[-1]][0]].strip()):
            marks.pop()
        last_special = marks[-1] if marks else None
        for t in toks:
            if last_special is None or t <= last_special:
                labels[t] = ids[t]
    if all(x == IGNORE_INDEX for x in labels[1:]):
        raise DataError(f"row {index}: no trainable token after response_part {response_part!r}")
    return labels


def train_on_responses_only(
    trainer_or_dataset: Any,
    instruction_part: str | None = None,
    response_part: str | None = None,
    *,
    tokenizer: Any = None,
    last_response_only: bool = False,
) -> Any:
    """Mask tokenized rows so only the assistant replies are trained (Unsloth's helper, by character offsets).

    ``trainer_or_dataset``: a list of tokenized rows (dicts with ``input_ids``, optionally ``labels`` and
    ``attention_mask``), a ``datasets.Dataset`` of them, or an object with ``.train_dataset`` (and optionally
    ``.eval_dataset``) holding such rows, e.g. a trainer -- its datasets are replaced and the object returned.
    Each row is decoded, every ``response_part`` is found by a character search, and the text from its end up to
    the next ``instruction_part`` (or the end) is trained, up to and including its last special token (the
    end-of-turn marker); everything else gets ``-100``. The parts default to those of the built-in template the
    tokenizer carries. A row without ``response_part`` raises :class:`DataError` naming the row.
    """
    holder = None
    if hasattr(trainer_or_dataset, "train_dataset"):
        holder = trainer_or_dataset
        if tokenizer is None:
            tokenizer = getattr(holder, "processing_class", None) or getattr(holder, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("train_on_responses_only needs tokenizer= to decode the rows")
    if response_part is None or instruction_part is None:
        t = next((t for t in CHAT_TEMPLATES.values() if t.jinja == getattr(tokenizer, "chat_template", None)), None)
        if t is None:
            raise ValueError(
                "pass instruction_part= and response_part= (the tokenizer's chat template is not a built-in one, "
                "so they cannot be inferred)"
            )
        instruction_part = t.instruction_part if instruction_part is None else instruction_part
        response_part = t.response_part if response_part is None else response_part
    if not response_part:
        raise ValueError("response_part must be a non-empty string")
    specials = special_token_ids(tokenizer)

    def mask(rows: Any) -> Any:
        if hasattr(rows, "map") and hasattr(rows, "column_names"):  # datasets.Dataset
            return rows.map(
                lambda row, i: {"labels": _response_labels(row, i, tokenizer, instruction_part, response_part,
                                                           last_response_only, specials)},
                with_indices=True,
            )
        return [
            {**row, "labels": _response_labels(row, i, tokenizer, instruction_part, response_part,
                                               last_response_only, specials)}
            for i, row in enumerate(rows)
        ]

    if holder is None:
        return mask(trainer_or_dataset)
    holder.train_dataset = mask(holder.train_dataset)
    if getattr(holder, "eval_dataset", None) is not None and not isinstance(holder.eval_dataset, dict):
        holder.eval_dataset = mask(holder.eval_dataset)
    return holder


def show_masked_sample(
    example: Mapping[str, Any], tokenizer: Any, *, markers: tuple[str, str] = ("[[", "]]"), echo: bool = False
) -> str:
    """The decoded row with masked text (label ``-100``) wrapped in ``markers`` and trained text plain.

    With ``echo=True`` it is also printed with rich, masked parts dimmed. Returns the marked string.
    """
    ids = [int(i) for i in example["input_ids"]]
    labels = list(example.get("labels", ids))
    if len(labels) != len(ids):
        raise ValueError(f"labels has {len(labels)} entries but input_ids has {len(ids)}")
    text, offsets = _decode_with_offsets(tokenizer, ids)
    runs: list[tuple[bool, str]] = []  # (masked, text)
    for t in range(len(ids)):
        start = offsets[t][0] if t else 0
        end = offsets[t + 1][0] if t + 1 < len(ids) else len(text)
        masked = labels[t] == IGNORE_INDEX
        piece = text[start:end]
        if runs and runs[-1][0] == masked:
            runs[-1] = (masked, runs[-1][1] + piece)
        else:
            runs.append((masked, piece))
    out = "".join(f"{markers[0]}{s}{markers[1]}" if m else s for m, s in runs)
    if echo:
        from rich.console import Console
        from rich.text import Text

        rich_text = Text()
        for m, s in runs:
            rich_text.append(s, style="dim" if m else None)
        Console().print(rich_text)
    return out
