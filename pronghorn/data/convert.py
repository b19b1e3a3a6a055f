"""Convert other dataset layouts to OpenAI-style ``role``/``content`` messages.

- ShareGPT (FastChat, LLaMA-Factory): ``{"conversations": [{"from": "human", "value": ...}, ...]}``. Roles:
  ``system``; ``human``/``user`` -> user; ``gpt``/``assistant`` -> assistant; ``function_call`` -> an assistant
  message with ``tool_calls`` (its value is the JSON ``{"name", "arguments"}``, or a list of them);
  ``observation``/``tool`` -> a ``tool`` message. :func:`standardize_sharegpt` carries Unsloth's name.
- Alpaca: ``{"instruction", "input", "output"}`` -> a user message and an assistant message.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Mapping

from .records import Record, as_record
from .row_checks import type_name

__all__ = ["SHAREGPT_ROLES", "alpaca_messages", "sharegpt_messages", "standardize_sharegpt"]

# ShareGPT "from" value -> role ("tool_call": an assistant message carrying tool calls)
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bard": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "function_call": "tool_call",
    "observation": "tool",
    "tool": "tool",
}


def sharegpt_messages(row: Record | Mapping[str, Any], field: str = "conversations") -> list[dict]:
    """One ShareGPT conversation as role/content messages (one message per turn, same positions).

    Raises :class:`DataError` naming the file, row and field (``conversations[3].from``) for a turn that is
    not an object, an unknown or missing ``from``, a missing, empty or non-string ``value``, or a
    ``function_call`` whose value is not the JSON of a tool call.
    """
    rec = as_record(row)
    turns = rec.row.get(field)
    if field not in rec.row:
        raise rec.error(field, "missing")
    if not isinstance(turns, list):
        raise rec.error(field, f"must be a list of {{'from', 'value'}} turns, got {type(turns).__name__}")
    if not turns:
        raise rec.error(field, "empty conversation")
    out = []
    for i, turn in enumerate(turns):
        path = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise rec.error(path, f"expected an object with 'from' and 'value', got {type(turn).__name__}")
        if "from" not in turn:
            raise rec.error(f"{path}.from", "missing")
        who = turn["from"]
        role = SHAREGPT_ROLES.get(who.lower()) if isinstance(who, str) else None
        if role is None:
            raise rec.error(f"{path}.from", f"unknown speaker {who!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        if "value" not in turn:
            raise rec.error(f"{path}.value", "missing")
        value = turn["value"]
        if not isinstance(value, str):
            raise rec.error(f"{path}.value", f"must be a string, got {type_name(value)}")
        if not value.strip():
            raise rec.error(f"{path}.value", "is empty")
        if role == "tool_call":
            out.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(rec, f"{path}.value", value)})
        else:
            out.append({"role": role, "content": value})
    return out


def _tool_calls(rec: Record, path: str, value: str) -> list[dict]:
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as e:
        raise rec.error(path, f"a function_call must hold the JSON of a tool call, invalid JSON: {e.msg}") from None
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            raise rec.error(path, 'a function_call must be {"name": str, "arguments": {...}} (or a list of them)')
        args = call.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass  # keep the string: templates print it as is
        out.append({"type": "function", "function": {"name": call["name"], "arguments": args}})
    return out


def standardize_sharegpt(dataset: Any, field: str | None = None) -> Any:
    """Unsloth's helper: turn ShareGPT ``from``/``value`` conversations into ``role``/``content`` messages.

    ``dataset``: a list of dicts (a new list is returned; other columns are kept), or a ``datasets.Dataset``
    (mapped; needs the optional ``datasets`` package). ``field``: the conversation column, by default
    ``conversations`` (else ``messages``). Rows already in role/content form are left as they are. Bad turns
    raise :class:`DataError` naming the row and field.
    """
    ds_mod = sys.modules.get("datasets")
    if ds_mod is not None and isinstance(dataset, getattr(ds_mod, "Dataset", ())):
        col = field or ("conversations" if "conversations" in dataset.column_names else "messages")

        def convert(row: dict, idx: int) -> dict:
            return {col: _standardized(as_record(row, "<dataset>", idx), col)}

        return dataset.map(convert, with_indices=True, desc="Standardizing ShareGPT")
    if isinstance(dataset, Mapping):
        raise TypeError("standardize_sharegpt expects a list of rows or a datasets.Dataset, not a single dict")
    out = []
    for i, row in enumerate(dataset):
        rec = as_record(row, "<memory>", i)
        col = field or ("conversations" if "conversations" in rec.row else "messages")
        out.append({**rec.row, col: _standardized(rec, col)})
    return out


def _standardized(rec: Record, col: str) -> list[dict]:
    turns = rec.row.get(col)
    if isinstance(turns, list) and turns and all(isinstance(t, dict) and "role" in t for t in turns):
        return turns
    return sharegpt_messages(rec, col)


def alpaca_messages(row: Record | Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    """An Alpaca row as (prompt, completion) message lists: the user message is the instruction, followed by
    ``"\\n\\n" + input`` when ``input`` is non-empty; the assistant message is the output. A ``system`` string
    column, when present and non-empty, becomes a system message."""
    rec = as_record(row)
    r = rec.row
    for key in ("instruction", "output"):
        if key not in r:
            raise rec.error(key, "missing (an Alpaca row needs 'instruction' and 'output', 'input' is optional)")
        if not isinstance(r[key], str):
            raise rec.error(key, f"must be a string, got {type_name(r[key])}")
        if not r[key].strip():
            raise rec.error(key, "is empty")
    extra = r.get("input")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise rec.error("input", f"must be a string, got {type_name(extra)}")
    user = r["instruction"] + ("\n\n" + extra if extra.strip() else "")
    prompt = [{"role": "user", "content": user}]
    system = r.get("system")
    if system is not None and not isinstance(system, str):
        raise rec.error("system", f"must be a string, got {type_name(system)}")
    if system and system.strip():
        prompt.insert(0, {"role": "system", "content": system})
    return prompt, [{"role": "assistant", "content": r["output"]}]
