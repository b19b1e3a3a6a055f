"""Checks on the fields of one row, shared by the format validators (formats, oasst, pretokenized, convert,
preference): each returns the checked value or raises the row's :class:`DataError` naming the field."""

from __future__ import annotations

from typing import Any

from .records import Record

__all__ = ["ROLES", "check_conversation", "require_string", "type_name"]

ROLES = ("system", "user", "assistant", "tool")


def require_string(rec: Record, field: str, value: Any, present: bool) -> str:
    """``value`` if it is a non-empty string; else an error naming ``field`` (``missing`` when not ``present``)."""
    if not present:
        raise rec.error(field, "missing")
    if not isinstance(value, str):
        raise rec.error(field, f"must be a string, got {type_name(value)}")
    if not value.strip():
        raise rec.error(field, "is empty")
    return value


def check_conversation(
    rec: Record, labelled: list[tuple[str, Any]], keys: tuple[str, str] = ("role", "content")
) -> None:
    """Validate each message and the role order: optional system first, then user and assistant turns
    alternating; an assistant message with ``tool_calls`` is followed by one or more ``tool`` messages and then
    an assistant message. The conversation ends with an assistant message (there must be something to train on).
    ``keys`` names the role/content fields in errors (``("from", "value")`` for ShareGPT rows)."""
    rk, ck = keys
    for path, msg in labelled:
        if not isinstance(msg, dict):
            raise rec.error(path, f"expected an object with 'role' and 'content', got {type_name(msg)}")
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
                raise rec.error(f"{path}.{ck}", f"must be a string, got {type_name(content)}")
        else:
            require_string(rec, f"{path}.{ck}", msg.get("content"), "content" in msg)

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
        raise rec.error(path, f"must be a non-empty list of tool calls, got {type_name(calls)}")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise rec.error(f"{path}[{j}]", "expected {'type': 'function', 'function': {'name', 'arguments'}}")
        require_string(rec, f"{path}[{j}].function.name", fn.get("name"), "name" in fn)
        args = fn.get("arguments", {})
        if not isinstance(args, (dict, str)):
            raise rec.error(f"{path}[{j}].function.arguments", f"must be an object or a JSON string, got {type_name(args)}")


def type_name(value: Any) -> str:
    """The JSON-ish name of ``value``'s type for error messages (``object``, ``list``, ``null``, ...)."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
