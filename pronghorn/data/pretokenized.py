"""Pre-tokenized rows: ``{"input_ids": [...]}`` plus optional ``labels``, ``completion_mask``,
``assistant_masks`` (TRL's pre-tokenized dataset columns), passed through after validation.

Labels follow the library's convention (not shifted: the model shifts them), so a label is ``-100`` or equals
the input id at the same position. Without ``labels`` every token is trained, except where
``completion_mask`` or ``assistant_masks`` is 0 (both apply when both are given, and they also mask given
labels). Ids and labels must be in the tokenizer's vocabulary range (checked when tokenizing).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..kernels import IGNORE_INDEX
from .formats import Example, register_format
from .records import Record, as_record
from .row_checks import type_name

__all__ = ["TOKENIZED", "TOKEN_FIELDS", "MASK_FIELDS", "is_pretokenized", "pretokenized_labels",
           "validate_pretokenized"]

TOKENIZED = "tokenized"
MASK_FIELDS = ("completion_mask", "assistant_masks")
TOKEN_FIELDS = ("input_ids", "labels") + MASK_FIELDS


def is_pretokenized(row: Mapping[str, Any]) -> bool:
    """True for a row holding ``input_ids``."""
    return "input_ids" in row


def _validate_pretokenized(rec: Record) -> Example:
    row = rec.row
    if "input_ids" not in row:
        raise rec.error("input_ids", "missing (a pre-tokenized row needs 'input_ids')")
    tokens = {"input_ids": _int_list(rec, "input_ids", row["input_ids"], minimum=0)}
    n = len(tokens["input_ids"])
    if n == 0:
        raise rec.error("input_ids", "is empty")
    for key in ("labels",) + MASK_FIELDS:
        if row.get(key) is None:
            continue
        values = _int_list(rec, key, row[key], minimum=IGNORE_INDEX if key == "labels" else 0)
        if len(values) != n:
            raise rec.error(key, f"has {len(values)} entries but 'input_ids' has {n}; they must be of equal length")
        for t, v in enumerate(values):
            if key == "labels" and v != IGNORE_INDEX and v != tokens["input_ids"][t]:
                raise rec.error(
                    f"labels[{t}]",
                    f"is {v} but input_ids[{t}] is {tokens['input_ids'][t]}; a label must be {IGNORE_INDEX} or equal the "
                    "input id at the same position (labels are not shifted: the model shifts them)",
                )
            if key != "labels" and v not in (0, 1):
                raise rec.error(f"{key}[{t}]", f"must be 0 or 1, got {v}")
        tokens[key] = values
    return Example(rec, TOKENIZED, "input_ids", tokens=tokens)


def _int_list(rec: Record, key: str, value: Any, minimum: int) -> list[int]:
    if hasattr(value, "tolist") and not isinstance(value, list):  # numpy arrays, torch tensors
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise rec.error(key, f"must be a list of integers, got {type_name(value)}")
    for t, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int):
            raise rec.error(f"{key}[{t}]", f"must be an integer, got {type_name(v)}")
        if v < minimum and not (key == "labels" and v == IGNORE_INDEX):
            raise rec.error(f"{key}[{t}]", f"is {v}; must be >= 0" + (f" or {IGNORE_INDEX}" if key == "labels" else ""))
    return list(value)


def pretokenized_labels(ex: Example, tokenizer: Any) -> tuple[list[int], list[int]]:
    """The (input_ids, labels) of a validated pre-tokenized row, checking ids against ``len(tokenizer)``."""
    tokens = ex.tokens
    ids = tokens["input_ids"]
    vocab = len(tokenizer) if tokenizer is not None else None
    if vocab is not None:
        bad = next((t for t, v in enumerate(ids) if v >= vocab), None)
        if bad is not None:
            raise ex.record.error(f"input_ids[{bad}]", f"token id {ids[bad]} is out of the tokenizer's vocabulary "
                                                       f"range [0, {vocab})")
    labels = list(tokens.get("labels", ids))
    for key in MASK_FIELDS:
        if key in tokens:
            labels = [lab if keep else IGNORE_INDEX for lab, keep in zip(labels, tokens[key])]
    return list(ids), labels


register_format(TOKENIZED, is_pretokenized, _validate_pretokenized)


def validate_pretokenized(row: Record | Mapping[str, Any]) -> Example:
    """Validate one pre-tokenized row (see the module docstring)."""
    return _validate_pretokenized(as_record(row))
