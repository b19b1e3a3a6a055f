"""SFT dataset formats (as TRL's SFTTrainer accepts them): detection and per-row validation.

Formats (one per dataset; detected from the first row unless given explicitly):

- ``"text"``: ``{"text": str}``, language modelling on the whole text.
- ``"prompt_completion"``: ``{"prompt": str, "completion": str}``, or TRL's conversational variant where both
  are lists of ``{"role", "content"}`` messages; only the completion is trained.
- ``"messages"``: ``{"messages": [{"role", "content"}, ...]}`` (the key ``conversations`` is accepted too);
  only assistant turns are trained.

:func:`validate_record` turns a row into an :class:`Example` or raises a :class:`DataError` naming the file,
row and field (``messages[3].content``). New formats plug in by adding a name to :data:`FORMATS` and a
validator to ``_VALIDATORS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import DataError
from .records import Record, as_record

__all__ = [
    "TEXT",
    "PROMPT_COMPLETION",
    "MESSAGES",
    "FORMATS",
    "MESSAGE_FIELDS",
    "ROLES",
    "Example",
    "check_format_name",
    "detect_format",
    "validate_record",
]

TEXT = "text"
PROMPT_COMPLETION = "prompt_completion"
MESSAGES = "messages"
FORMATS = (TEXT, PROMPT_COMPLETION, MESSAGES)
MESSAGE_FIELDS = ("messages", "conversations")  # row keys holding a conversation, in order of preference
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """A validated row. ``field`` is the row key holding the trained data (used in error messages).

    text: ``text``. prompt_completion: ``prompt`` and ``completion`` (both strings, or both message lists).
    messages: ``messages``.
    """

    record: Record
    fmt: str
    field: str
    text: str | None = None
    prompt: str | list[dict] | None = None
    completion: str | list[dict] | None = None
    messages: list[dict] | None = None

    @property
    def conversational(self) -> bool:
        """True when the row is rendered with a chat template."""
        return self.fmt == MESSAGES or isinstance(self.prompt, list)


def detect_format(row: Record | Mapping[str, Any]) -> str:
    """Guess a row's format from its keys.

    Preference: ``messages``/``conversations``, then ``prompt`` + ``completion``, then ``text``.
    """
    rec = as_record(row)
    keys = rec.row
    if any(k in keys for k in MESSAGE_FIELDS):
        return MESSAGES
    if "prompt" in keys and "completion" in keys:
        return PROMPT_COMPLETION
    if "text" in keys:
        return TEXT
    if "prompt" in keys or "completion" in keys:
        return PROMPT_COMPLETION  # validation then names the missing half
    found = ", ".join(repr(k) for k in list(keys)[:10]) or "none"
    raise DataError(
        f"{rec.where}: cannot tell the dataset format: expected a field 'text', 'prompt' and 'completion', "
        f"'messages' or 'conversations' (fields found: {found}); convert the rows or pass fmt= one of {FORMATS}"
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
    return Example(rec, MESSAGES, field, messages=messages)


_VALIDATORS: dict[str, Callable[[Record], Example]] = {
    TEXT: _validate_text,
    PROMPT_COMPLETION: _validate_prompt_completion,
    MESSAGES: _validate_messages,
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


def _check_conversation(rec: Record, labelled: list[tuple[str, Any]]) -> None:
    """Validate each message and the role order: optional system first, then user/assistant alternating,
    ending with assistant (there must be something to train on)."""
    for path, msg in labelled:
        if not isinstance(msg, dict):
            raise rec.error(path, f"expected an object with 'role' and 'content', got {_type(msg)}")
        if "role" not in msg and "from" in msg and "value" in msg:
            raise rec.error(
                path,
                "uses ShareGPT keys 'from'/'value'; expected OpenAI-style 'role'/'content' "
                "(roles 'system', 'user', 'assistant')",
            )
        if "role" not in msg:
            raise rec.error(f"{path}.role", "missing")
        role = msg["role"]
        if role not in ROLES:
            raise rec.error(f"{path}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        _string(rec, f"{path}.content", msg.get("content"), "content" in msg)

    expected = "user"
    for pos, (path, msg) in enumerate(labelled):
        role = msg["role"]
        if role == "system":
            if pos != 0:
                raise rec.error(f"{path}.role", "a 'system' message is only allowed as the first message")
            continue
        if role != expected:
            previous = labelled[pos - 1][1]["role"] if pos else None
            after = f"after {previous!r}" if previous else "as the first message"
            raise rec.error(
                f"{path}.role",
                f"expected {expected!r} {after}, got {role!r}; roles must alternate user/assistant "
                "(after an optional first system message)",
            )
        expected = "assistant" if role == "user" else "user"
    path, last = labelled[-1]
    if last["role"] != "assistant":
        raise rec.error(
            f"{path}.role",
            f"the conversation must end with an 'assistant' message to train on, got {last['role']!r}",
        )


def _type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
