"""Load dataset rows from ``.json`` / ``.jsonl`` files, keeping where each row came from.

Every row is wrapped in a :class:`Record` that remembers its file and position, so that any later error
(format validation, tokenization, truncation) can name the culprit: ``data.jsonl line 7`` (1-based line of a
JSONL file) or ``data.json index 3 (0-based)`` (position in a JSON list).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from ..errors import DataError

__all__ = ["Record", "as_record", "load_records", "records_from_rows"]

SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class Record:
    """One dataset row and its origin.

    ``kind`` says how ``index`` counts: ``"line"`` is the 1-based line number in a JSONL file, ``"index"`` the
    0-based position in a JSON list (or any in-memory sequence).
    """

    source: str
    index: int
    row: dict[str, Any]
    kind: Literal["line", "index"] = "index"

    @property
    def where(self) -> str:
        """Human-readable location, e.g. ``'c4.jsonl line 12'`` or ``'kto.json index 3 (0-based)'``."""
        if self.kind == "line":
            return f"{self.source} line {self.index}"
        return f"{self.source} index {self.index} (0-based)"

    def error(self, field: str, message: str) -> DataError:
        """A :class:`DataError` naming this record's file, row and ``field`` (e.g. ``messages[2].content``)."""
        return DataError(f"{self.where}: field {field!r}: {message}")


def as_record(row: Record | Mapping[str, Any], source: str = "<row>", index: int = 0) -> Record:
    """Wrap a bare mapping in a :class:`Record` (a Record is returned unchanged)."""
    if isinstance(row, Record):
        return row
    if not isinstance(row, Mapping):
        raise DataError(f"{source} index {index} (0-based): expected an object (dict), got {type(row).__name__}")
    return Record(source=source, index=index, row=dict(row), kind="index")


def records_from_rows(rows: Iterable[Mapping[str, Any]], source: str = "<memory>") -> list[Record]:
    """Wrap in-memory rows (a list of dicts, a ``datasets.Dataset``, ...) as Records with 0-based indices."""
    records = [as_record(row, source, i) for i, row in enumerate(rows)]
    if not records:
        raise DataError(f"{source}: the dataset is empty (no rows)")
    return records


def load_records(path: str | os.PathLike) -> list[Record]:
    """Read every row of a ``.json`` (a list of objects, or ``{"data": [...]}``) or ``.jsonl`` file.

    Blank JSONL lines are skipped. Raises :class:`DataError` for a missing file, an unsupported suffix,
    invalid JSON (with its line number), a row that is not an object, or a dataset with no rows.
    """
    path = Path(path)
    name = str(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{name}: unsupported dataset file type {suffix or '(no suffix)'!r}; expected .json or .jsonl")
    if not path.is_file():
        raise DataError(f"{name}: no such file" if not path.exists() else f"{name}: not a regular file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not valid UTF-8 text (byte {e.start}): {e.reason}") from None
    records = _parse_jsonl(text, name) if suffix == ".jsonl" else _parse_json(text, name)
    if not records:
        raise DataError(f"{name}: the dataset is empty (no rows)")
    return records


def _parse_jsonl(text: str, name: str) -> list[Record]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name} line {lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{name} line {lineno}: expected a JSON object, got {_json_type(row)}")
        records.append(Record(source=name, index=lineno, row=row, kind="line"))
    return records


def _parse_json(text: str, name: str) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if isinstance(data, dict):
        if "data" not in data:
            raise DataError(
                f"{name}: top-level JSON object has no 'data' field; expected a list of rows or "
                f"{{\"data\": [...]}} (found keys: {', '.join(map(repr, list(data)[:8]))})"
            )
        data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{name}: field 'data' must be a list of rows, got {_json_type(data)}")
    elif not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of rows or {{\"data\": [...]}}, got {_json_type(data)}")
    records = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{name} index {i} (0-based): expected a JSON object, got {_json_type(row)}")
        records.append(Record(source=name, index=i, row=row, kind="index"))
    return records


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
