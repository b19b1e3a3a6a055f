"""Load dataset rows from files and folders, keeping where each row came from.

Sources: ``.json`` (a list of objects, or ``{"data": [...]}``), ``.jsonl``, ``.csv`` (header row, every cell a
string; read with the standard library), ``.parquet`` (needs ``pyarrow``), ``.txt`` (``{"text": ...}`` rows:
by default one per non-blank line; ``sample_by`` as Hugging Face's ``text`` loader: ``"line"``, ``"paragraph"``
(blocks between blank lines) or ``"document"`` (the whole file)), a folder of such files (read in sorted path
order, hidden files skipped) or a glob pattern matching them (``"books/*.txt"``, ``"**"`` recursing), a Hugging Face ``datasets.Dataset`` / ``IterableDataset`` object (when ``datasets`` is installed), and
a Hugging Face Hub dataset name (``"openai/gsm8k"``: any string that is not an existing path nor a dataset file
name; loaded with ``datasets.load_dataset``, so it needs ``datasets`` and a network or its local cache).

Every row is wrapped in a :class:`Record` that remembers its file and position, so that any later error
(format validation, tokenization, truncation) can name the culprit: ``data.jsonl line 7`` (1-based line of a
JSONL, CSV or text file; for CSV the line where the row starts) or ``data.json index 3 (0-based)`` (position in
a JSON list, a Parquet file or an in-memory dataset).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from ..errors import DataError

__all__ = ["SAMPLE_BY", "Record", "as_record", "load_records", "records_from_rows"]

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
SAMPLE_BY = ("line", "paragraph", "document")  # how a .txt file is cut into rows (Hugging Face's names)
_GLOB_CHARS = "*?["


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


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_records(source: str | os.PathLike | Any, split: str = "train", subset: str | None = None,
                 sample_by: str = "line") -> list[Record]:
    """Read every row of a dataset file, a folder of dataset files, a glob pattern, a ``datasets``
    (Iterable)Dataset, or a Hugging Face Hub dataset (``split`` and ``subset``, its configuration name, apply to
    Hub datasets only; ``sample_by`` to ``.txt`` files: a row per ``"line"``, ``"paragraph"`` or ``"document"``).

    Blank JSONL / text lines are skipped. Raises :class:`DataError` for a missing file, an unsupported suffix,
    invalid JSON (with its line number), a malformed CSV row, a row that is not an object, a Parquet file
    without ``pyarrow`` installed, a folder with no dataset file, or a dataset with no rows.
    """
    if _is_hf_dataset(source):
        name = getattr(getattr(source, "info", None), "dataset_name", None)
        return records_from_rows(source, source=f"<datasets {type(source).__name__}{' ' + name if name else ''}>")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_records expects a path or a datasets.Dataset, got {type(source).__name__}")
    if sample_by not in SAMPLE_BY:
        raise ValueError(f"sample_by must be one of {', '.join(SAMPLE_BY)}, got {sample_by!r}")
    path = Path(source)
    if path.is_dir():
        return _load_folder(path, sample_by)
    if isinstance(source, str) and not path.exists() and any(c in source for c in _GLOB_CHARS):
        return _load_glob(source, sample_by)
    name = str(path)
    suffix = path.suffix.lower()
    if isinstance(source, str) and not path.exists() and suffix not in SUFFIXES and _HUB_NAME.match(source):
        return _load_hub(source, split, subset)
    if suffix not in SUFFIXES:
        raise DataError(
            f"{name}: unsupported dataset file type {suffix or '(no suffix)'!r}; expected one of {', '.join(SUFFIXES)}"
        )
    if not path.is_file():
        raise DataError(f"{name}: no such file" if not path.exists() else f"{name}: not a regular file")
    if suffix == ".parquet":
        records = _read_parquet(path, name)
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{name}: not valid UTF-8 text (byte {e.start}): {e.reason}") from None
        if suffix == ".txt":
            records = _parse_txt(text, name, sample_by)
        else:
            records = {".jsonl": parse_jsonl, ".json": _parse_json, ".csv": _parse_csv}[suffix](text, name)
    if not records:
        raise DataError(f"{name}: the dataset is empty (no rows)")
    return records


def _load_hub(name: str, split: str, subset: str | None) -> list[Record]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name}: no such file or folder; to load it as a Hugging Face Hub dataset install the 'datasets' "
            "package (pip install datasets)"
        ) from None
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # offline, unknown name, unknown split, gated: datasets raises many kinds
        raise DataError(
            f"{name}: no such file or folder, and loading it as a Hugging Face Hub dataset (split {split!r}) "
            f"failed: {type(e).__name__}: {e}. Without a network, download it where there is one (or point at "
            "a local .json/.jsonl/.csv/.parquet/.txt file or folder)"
        ) from None
    return records_from_rows(ds, source=f"{name}[{split}]")


def _is_hf_dataset(obj: Any) -> bool:
    mod = sys.modules.get("datasets")  # only if the user imported it: never import it ourselves
    if mod is None:
        return False
    kinds = tuple(k for k in (getattr(mod, "Dataset", None), getattr(mod, "IterableDataset", None)) if k)
    return bool(kinds) and isinstance(obj, kinds)


def _load_folder(path: Path, sample_by: str) -> list[Record]:
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path}: the folder holds no dataset file ({', '.join(SUFFIXES)})")
    return [rec for f in files for rec in load_records(f, sample_by=sample_by)]


def _load_glob(pattern: str, sample_by: str) -> list[Record]:
    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    files = [p for p in files if p.is_file() and p.suffix.lower() in SUFFIXES]
    if not files:
        raise DataError(f"{pattern}: the pattern matches no dataset file ({', '.join(SUFFIXES)})")
    return [rec for f in files for rec in load_records(f, sample_by=sample_by)]


def _parse_csv(text: str, name: str) -> list[Record]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as e:
        raise DataError(f"{name} line 1: invalid CSV: {e}") from None
    if not header or any(not h.strip() for h in header):
        raise DataError(f"{name} line 1: the CSV header has an empty column name ({header!r})")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{name} line 1: the CSV header repeats column(s) {', '.join(map(repr, dupes))}")
    records = []
    line = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{name} line {line}: invalid CSV: {e}") from None
        if cells and any(c.strip() for c in cells):
            if len(cells) != len(header):
                raise DataError(
                    f"{name} line {line}: expected {len(header)} CSV fields like the header, got {len(cells)}"
                )
            records.append(Record(source=name, index=line, row=dict(zip(header, cells)), kind="line"))
        line = reader.line_num + 1
    return records


def _parse_txt(text: str, name: str, sample_by: str = "line") -> list[Record]:
    """``{"text": ...}`` rows, each at the line where it starts: one per non-blank line, per paragraph (lines
    up to a blank one, joined by newlines) or the whole file as one document."""
    if sample_by == "document":
        return [Record(source=name, index=1, row={"text": text}, kind="line")] if text.strip() else []
    records, block, start = [], [], 0
    for lineno, line in enumerate(text.splitlines() + [""], start=1):
        if line.strip() and sample_by == "paragraph":
            block, start = block + [line], start or lineno
        elif line.strip():
            records.append(Record(source=name, index=lineno, row={"text": line}, kind="line"))
        elif block:
            records.append(Record(source=name, index=start, row={"text": "\n".join(block)}, kind="line"))
            block, start = [], 0
    return records


def _read_parquet(path: Path, name: str) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{name}: reading Parquet files needs the 'pyarrow' package (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{name}: not a readable Parquet file: {e}") from None
    return [Record(source=name, index=i, row=row, kind="index") for i, row in enumerate(rows)]


def parse_jsonl(text: str, name: str) -> list[Record]:
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
