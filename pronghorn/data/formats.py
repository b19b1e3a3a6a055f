"""SFT dataset formats (as TRL's SFTTrainer accepts them): detection and per-row validation.

Formats (one per dataset; detected from the first row unless given explicitly):

- ``"text"``: ``{"text": str}``, language modelling on the whole text (a row longer than ``max_length`` is
  truncated, split or dropped as ``overlong`` says).
- ``"raw_text"``: ``{"text": str}`` rows read as documents for continued pretraining: never truncated, but
  concatenated and cut into ``max_length`` blocks with the documents kept apart (:mod:`pronghorn.data.raw_text`).
  Never detected: ask for it with ``data_format="raw_text"``.
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
from .row_checks import check_conversation, require_string, type_name

__all__ = [
    "TEXT",
    "RAW_TEXT",
    "PROMPT_COMPLETION",
    "MESSAGES",
    "SHAREGPT",
    "ALPACA",
    "FORMATS",
    "MESSAGE_FIELDS",
    "Example",
    "check_format_name",
    "detect_format",
    "register_format",
    "validate_record",
]

TEXT = "text"
RAW_TEXT = "raw_text"
PROMPT_COMPLETION = "prompt_completion"
MESSAGES = "messages"
SHAREGPT = "sharegpt"
ALPACA = "alpaca"
FORMATS = [TEXT, RAW_TEXT, PROMPT_COMPLETION, MESSAGES, SHAREGPT, ALPACA]  # other modules append theirs
MESSAGE_FIELDS = ("messages", "conversations")  # row keys holding a conversation, in order of preference


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
# (oasst trees, pre-tokenized rows) register theirs with :func:`register_format` when imported; ``pronghorn.data``
# imports them, so importing any data module registers all formats.
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


def _validate_text(rec: Record, fmt: str = TEXT) -> Example:
    return Example(rec, fmt, "text", text=require_string(rec, "text", rec.row.get("text"), "text" in rec.row))


def _validate_raw_text(rec: Record) -> Example:
    return _validate_text(rec, RAW_TEXT)


def _validate_prompt_completion(rec: Record) -> Example:
    for key in ("prompt", "completion"):
        if key not in rec.row:
            raise rec.error(key, "missing (a prompt_completion row needs both 'prompt' and 'completion')")
    prompt, completion = rec.row["prompt"], rec.row["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, list):
                raise rec.error(
                    key, f"must be a list of messages like the other half of the row, got {type_name(value)}"
                )
            if not value:
                raise rec.error(key, "empty list of messages")
        labelled = [(f"prompt[{i}]", m) for i, m in enumerate(prompt)]
        labelled += [(f"completion[{i}]", m) for i, m in enumerate(completion)]
        check_conversation(rec, labelled)
        return Example(rec, PROMPT_COMPLETION, "completion", prompt=prompt, completion=completion)
    return Example(
        rec,
        PROMPT_COMPLETION,
        "completion",
        prompt=require_string(rec, "prompt", prompt, True),
        completion=require_string(rec, "completion", completion, True),
    )


def _validate_messages(rec: Record) -> Example:
    field = next((k for k in MESSAGE_FIELDS if k in rec.row), None)
    if field is None:
        raise rec.error("messages", "missing (a messages row needs 'messages' or 'conversations')")
    messages = rec.row[field]
    if not isinstance(messages, list):
        raise rec.error(field, f"must be a list of {{'role', 'content'}} messages, got {type_name(messages)}")
    if not messages:
        raise rec.error(field, "empty conversation")
    check_conversation(rec, [(f"{field}[{i}]", m) for i, m in enumerate(messages)])
    return Example(rec, MESSAGES, field, messages=messages, tools=_tools(rec))


def _validate_sharegpt(rec: Record) -> Example:
    from .convert import sharegpt_messages

    field = next((k for k in MESSAGE_FIELDS if k in rec.row), None)
    if field is None:
        raise rec.error("conversations", "missing (a ShareGPT row needs 'conversations' with 'from'/'value')")
    messages = sharegpt_messages(rec, field)
    check_conversation(rec, [(f"{field}[{i}]", m) for i, m in enumerate(messages)], keys=("from", "value"))
    return Example(rec, SHAREGPT, field, messages=messages, tools=_tools(rec))


def _validate_alpaca(rec: Record) -> Example:
    from .convert import alpaca_messages

    prompt, completion = alpaca_messages(rec)
    return Example(rec, ALPACA, "output", prompt=prompt, completion=completion,
                   fields=("system",) * (len(prompt) - 1) + ("instruction", "output"))


_VALIDATORS: dict[str, Callable[[Record], Example]] = {
    TEXT: _validate_text,
    RAW_TEXT: _validate_raw_text,
    PROMPT_COMPLETION: _validate_prompt_completion,
    MESSAGES: _validate_messages,
    SHAREGPT: _validate_sharegpt,
    ALPACA: _validate_alpaca,
}


# -- helpers -------------------------------------------------------------------------------------------


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
        raise rec.error("tools", f"must be a list of tool JSON schemas (objects), got {type_name(tools)}")
    return tools or None
