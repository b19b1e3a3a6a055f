"""SFT dataset formats (as TRL's SFTTrainer accepts them): detection and per-row validation.

Formats (one per dataset; detected from the first row unless given explicitly):

- ``"text"``: ``{"text": str}``, language modelling on the whole text.
- ``"prompt_completion"``: ``{"prompt": str, "completion": str}``, or TRL's conversational variant where both
  are lists of ``{"role", "content"}`` messages; only the completion is trained.
- ``"messages"``: ``{"messages": [{"role", "content"}, ...]}`` (the key ``conversations`` is accepted too);
  only assistant turns are trained. Roles: system (first only), user, assistant, tool; an assistant message
  may carry ``tool_calls`` (then tool messages follow it). An optional ``tools`` column (a list of JSON
  schemas, or that list as a JSON string) is handed to the chat template.
- ``"sharegpt"``: ``{"conversations": [{"from", "value"}, ...]}`` (human/gpt/system, function_call,
  observation), standardized to ``messages`` (see :func:`pronghorn.data.convert.standardize_sharegpt`).
- ``"alpaca"``: ``{"instruction", "input", "output"}``: a user message (instruction, plus ``"\n\n" + input``
  when input is non-empty) and an assistant message; only the output is trained.

:func:`validate_record` turns a row into an :class:`Example` or raises a :class:`DataError` naming the file,
row and field (``messages[3].content``). New formats plug in by adding a name to :data:`FORMATS` and a
validator to ``_VALIDATORS``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import DataError
from .records import Record, as_record

__all__ = [
    "TEXT",
    "PROMPT_COMPLETION",
    "MESSAGES",
    "SHAREGPT",
    "ALPACA",
    "FORMATS",
    "MESSAGE_FIELDS",
    "ROLES",
    "Example",
    "check_format_name",
    "detect_format",
    "register_format",
    "validate_record",
]

TEXT = "text"
PROMPT_COMPLETION = "prompt_completion"
MESSAGES = "messages"
SHAREGPT = "sharegpt"
ALPACA = "alpaca"
FORMATS = [TEXT, PROMPT_COMPLETION, MESSAGES, SHAREGPT, ALPACA]  # other modules append theirs
MESSAGE_FIELDS = ("messages", "conversations")  # row keys holding a conversation, in order of preference
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Example:
    """A validated row. ``field`` is the row key holding the trained data (used in error messages).

    text: ``text``. prompt_completion and alpaca: ``prompt`` and ``completion`` (both strings, or both message
    lists). messages and sharegpt: ``messages`` (role/content). ``tools``: the row's tool schemas, if any.
    ``fields``: for chat rows, the row field naming each message (``conversations[2]``, ``output``), used in
    errors. ``tokens``: for pre-tokenized rows, the validated id/label/mask columns.
    """

    record: Record
    fmt: str
    field: str
    text: str | None = None
    prompt: str | list[dict] | None = None
    completion: str | list[dict] | None = None
    messages: list[dict] | None = None
    tools: list[dict] | None = None
    fields: tuple[str, ...] | None = None
    tokens: dict[str, list[int]] | None = None

    @property
    def conversational(self) -> bool:
        """True when the row is rendered with a chat template."""
        return self.messages is not None or isinstance(self.prompt, list)

    def message_field(self, i: int) -> str:
        """The row field holding message ``i`` of the rendered conversation (``prompt + completion``)."""
        if self.fields is not None:
            return self.fields[i]
        if self.messages is not None:
            return f"{self.field}[{i}]"
        n = len(self.prompt)
        return f"prompt[{i}]" if i < n else f"completion[{i - n}]"


# Extra format detectors, tried before the built-in ones: (name, predicate on the row dict). Other modules
# (oasst trees, pre-tokenized rows) register theirs with :func:`register_format`.
_DETECTORS: list[tuple[str, Callable[[Mapping[str, Any]], bool]]] = []


def register_format(name: str, detect: Callable[[Mapping[str, Any]], bool] | None,
                    validate: Callable[[Record], "Example"]) -> None:
    """Add a format: ``detect(row)`` says whether a row is of it (None: only by explicit ``fmt=``),
    ``validate(record)`` returns its :class:`Example`."""
    if name not in FORMATS:
        FORMATS.append(name)
    _VALIDATORS[name] = validate
    if detect is not None and all(n != name for n, _ in _DETECTORS):
        _DETECTORS.append((name, detect))


def _is_sharegpt(row: Mapping[str, Any]) -> bool:
    conv = row.get("conversations", row.get("messages"))
    return (isinstance(conv, list) and bool(conv) and isinstance(conv[0], dict)
            and "from" in conv[0] and "role" not in conv[0])


def detect_format(row: Record | Mapping[str, Any]) -> str:
    """Guess a row's format from its keys.

    Preference: registered formats (pre-tokenized ``input_ids``, OpenAssistant trees), ShareGPT
    ``conversations`` with ``from``/``value``, ``messages``/``conversations``, then ``prompt`` + ``completion``,
    then Alpaca ``instruction`` + ``output``, then ``text``.
    """
    rec = as_record(row)
    keys = rec.row
    for name, detect in _DETECTORS:
        if detect(keys):
            return name
    if "chosen" in keys and "rejected" in keys:  # a preference row: SFT has no completion to train on
        raise DataError(
            f"{rec.where}: a preference row ('chosen' and 'rejected'); train it with method='dpo' "
            "(CLI: --method dpo), or 'orpo'; for supervised fine-tuning give 'text', 'prompt' + 'completion' "
            "or 'messages' rows"
        )
    if _is_sharegpt(keys):
        return SHAREGPT
    if any(k in keys for k in MESSAGE_FIELDS):
        return MESSAGES
    if "prompt" in keys and "completion" in keys:
        return PROMPT_COMPLETION
    if "instruction" in keys and "output" in keys:
        return ALPACA
    if "text" in keys:
        return TEXT
    if "prompt" in keys or "completion" in keys:
        return PROMPT_COMPLETION  # validation then names the missing half
    found = ", ".join(repr(k) for k in list(keys)[:10]) or "none"
    raise DataError(
        f"{rec.where}: cannot tell the dataset format: expected a field 'text', 'prompt' and 'completion', "
        f"'messages' or 'conversations', 'instruction' and 'output', or 'input_ids' (fields found: {found}); "
        f"convert the rows or pass data_format= (CLI: --data-format; fmt= in pronghorn.data) one of "
        f"{', '.join(FORMATS)}"
    )


def check_format_name(fmt: str) -> str:
    """Return ``fmt`` if it names a known format, else raise ``ValueError`` listing them."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def validate_record(row: Record | Mapping[str, Any], fmt: str | None = None) -> Example:
    """Check one row against ``fmt`` (detected from the row when None) and return it as an :class:`Example`."""
    rec = as_record(row)
    fmt = detect_format(rec) if fmt is None else check_format_name(fmt)
    return _VALIDATORS[fmt](rec)


# -- per-format validators ------------------------------------------------------------------------------


def _validate_text(rec: Record) -> Example:
    return Example(rec, TEXT, "text", text=_string(rec, "text", rec.row.get("text"), "text" in rec.row))


def _validate_prompt_completion(rec: Record) -> Example:
    for key in ("prompt", "completion"):
        if key not in rec.row:
            raise rec.error(key, "missing (a prompt_completion row needs both 'prompt' and 'completion')")
    prompt, completion = rec.row["prompt"], rec.row["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, list):
                raise rec.error(
                    key, f"must be a list of messages like the other half of the row, got {_type(value)}"
                )
            if not value:
                raise rec.error(key, "empty list of messages")
        labelled = [(f"prompt[{i}]", m) for i, m in enumerate(prompt)]
        labelled += [(f"completion[{i}]", m) for i, m in enumerate(completion)]
        _check_conversation(rec, labelled)
        return Example(rec, PROMPT_COMPLETION, "completion", prompt=prompt, completion=completion)
    return Example(
        rec,
        PROMPT_COMPLETION,
        "completion",
        prompt=_string(rec, "prompt", prompt, True),
        completion=_string(rec, "completion", completion, True),
    )


def _validate_messages(rec: Record) -> Example:
    field = next((k for k in MESSAGE_FIELDS if k in rec.row), None)
    if field is None:
        raise rec.error("messages", "missing (a messages row needs 'messages' or 'conversations')")
    messages = rec.row[field]
    if not isinstance(messages, list):
        raise rec.error(field, f"must be a list of {{'role', 'content'}} messages, got {_type(messages)}")
    if not messages:
        raise rec.error(field, "empty conversation")
    _check_conversation(rec, [(f"{field}[{i}]", m) for i, m in enumerate(messages)])
    return Example(rec, MESSAGES, field, messages=messages, tools=_tools(rec))


def _validate_sharegpt(rec: Record) -> Example:
    from .convert import sharegpt_messages

    field = next((k for k in MESSAGE_FIELDS if k in rec.row), None)
    if field is None:
        raise rec.error("conversations", "missing (a ShareGPT row needs 'conversations' with 'from'/'value')")
    messages = sharegpt_messages(rec, field)
    _check_conversation(rec, [(f"{field}[{i}]", m) for i, m in enumerate(messages)], keys=("from", "value"))
    return Example(rec, SHAREGPT, field, messages=messages, tools=_tools(rec))


def _validate_alpaca(rec: Record) -> Example:
    from .convert import alpaca_messages

    prompt, completion = alpaca_messages(rec)
    return Example(rec, ALPACA, "output", prompt=prompt, completion=completion,
                   fields=("system",) * (len(prompt) - 1) + ("instruction", "output"))


_VALIDATORS: dict[str, Callable[[Record], Example]] = {
    TEXT: _validate_text,
    PROMPT_COMPLETION: _validate_prompt_completion,
    MESSAGES: _validate_messages,
    SHAREGPT: _validate_sharegpt,
    ALPACA: _validate_alpaca,
}


# -- helpers -------------------------------------------------------------------------------------------


def _string(rec: Record, field: str, value: Any, present: bool) -> str:
    if not present:
        raise rec.error(field, "missing")
    if not isinstance(value, str):
        raise rec.error(field, f"must be a string, got {_type(value)}")
    if not value.strip():
        raise rec.error(field, "is empty")
    return value


def _check_conversation(
    rec: Record, labelled: list[tuple[str, Any]], keys: tuple[str, str] = ("role", "content")
) -> None:
    """Validate each message and the role order: optional system first, then user and assistant turns
    alternating; an assistant message with ``tool_calls`` is followed by one or more ``tool`` messages and then
    an assistant message. The conversation ends with an assistant message (there must be something to train on).
    ``keys`` names the role/content fields in errors (``("from", "value")`` for ShareGPT rows)."""
    rk, ck = keys
    for path, msg in labelled:
        if not isinstance(msg, dict):
            raise rec.error(path, f"expected an object with 'role' and 'content', got {_type(msg)}")
        if "role" not in msg and "from" in msg and "value" in msg:
            raise rec.error(
                path,
                "uses ShareGPT keys 'from'/'value'; expected OpenAI-style 'role'/'content' "
                "(roles 'system', 'user', 'assistant'); pass data_format='sharegpt' (CLI: --data-format sharegpt; "
                "fmt='sharegpt' in pronghorn.data) or use standardize_sharegpt()",
            )
        if "role" not in msg:
            raise rec.error(f"{path}.{rk}", "missing")
        role = msg["role"]
        if role not in ROLES:
            raise rec.error(f"{path}.{rk}", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        calls = msg.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise rec.error(f"{path}.tool_calls", f"only assistant messages may carry tool calls, not {role!r}")
            _check_tool_calls(rec, f"{path}.tool_calls", calls)
            content = msg.get("content")
            if content is not None and not isinstance(content, str):
                raise rec.error(f"{path}.{ck}", f"must be a string, got {_type(content)}")
        else:
            _string(rec, f"{path}.{ck}", msg.get("content"), "content" in msg)

    expected: tuple[str, ...] = ("user",)
    for pos, (path, msg) in enumerate(labelled):
        role = msg["role"]
        if role == "system":
            if pos != 0:
                raise rec.error(f"{path}.{rk}", "a 'system' message is only allowed as the first message")
            continue
        if role not in expected:
            previous = labelled[pos - 1][1]["role"] if pos else None
            after = f"after {previous!r}" if previous else "as the first message"
            want = " or ".join(map(repr, expected))
            raise rec.error(
                f"{path}.{rk}",
                f"expected {want} {after}, got {role!r}; roles must alternate user/assistant "
                "(after an optional first system message; tool messages only after an assistant tool call)",
            )
        if role == "user":
            expected = ("assistant",)
        elif role == "assistant":
            expected = ("tool",) if msg.get("tool_calls") else ("user",)
        else:  # tool
            expected = ("tool", "assistant")
    path, last = labelled[-1]
    if last["role"] != "assistant" or last.get("tool_calls"):
        got = repr(last["role"])
        if last.get("tool_calls"):
            got = "an assistant tool call (no tool result and answer follow)"
        raise rec.error(
            f"{path}.{rk}",
            f"the conversation must end with an 'assistant' message to train on, got {got}",
        )


def _check_tool_calls(rec: Record, path: str, calls: Any) -> None:
    if not isinstance(calls, list) or not calls:
        raise rec.error(path, f"must be a non-empty list of tool calls, got {_type(calls)}")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise rec.error(f"{path}[{j}]", "expected {'type': 'function', 'function': {'name', 'arguments'}}")
        _string(rec, f"{path}[{j}].function.name", fn.get("name"), "name" in fn)
        args = fn.get("arguments", {})
        if not isinstance(args, (dict, str)):
            raise rec.error(f"{path}[{j}].function.arguments", f"must be an object or a JSON string, got {_type(args)}")


def _tools(rec: Record) -> list[dict] | None:
    """The row's ``tools`` column: a list of JSON schemas (a JSON string is decoded); None when absent/empty."""
    tools = rec.row.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise rec.error("tools", f"not valid JSON (column {e.colno}): {e.msg}") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise rec.error("tools", f"must be a list of tool JSON schemas (objects), got {_type(tools)}")
    return tools or None


def _type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# formats defined in their own modules register themselves on import
from . import oasst as _oasst  # noqa: E402,F401
from . import pretokenized as _pretokenized  # noqa: E402,F401
