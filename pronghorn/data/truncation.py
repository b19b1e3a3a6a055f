"""Fit one tokenized row to ``max_length``: truncation side and the overlong-row policy.

- ``truncation_mode``: ``"keep_start"`` (drop the tokens past ``max_length``; TRL's and Hugging Face's default)
  or ``"keep_end"`` (drop the oldest tokens, keeping the end of the conversation and its final answer).
- ``overlong`` (what to do with a row longer than ``max_length``): ``"truncate"`` (as ``truncation_mode``
  says), ``"split"`` (consecutive chunks of ``max_length`` tokens, each its own example; a chunk with no
  trained token is left out), ``"drop"`` (leave the row out) or ``"error"`` (a :class:`DataError` naming it).

Labels are not shifted (the model shifts them), so the label at a row's first position is never a target:
a row "has a trainable token" when some label after position 0 is not ``-100``. Splitting therefore loses the
first label of each chunk after the first (the model has no context for it in that chunk).
"""

from __future__ import annotations

from ..errors import spell
from ..kernels import IGNORE_INDEX
from .records import Record

__all__ = ["OVERLONG_ROWS", "TRUNCATION_MODES", "fit_to_length", "check_fit_options"]

TRUNCATION_MODES = ("keep_start", "keep_end")
OVERLONG_ROWS = ("truncate", "split", "drop", "error")


def check_fit_options(max_length: int | None, truncation_mode: str, overlong: str) -> None:
    """Raise ``ValueError`` for a bad ``max_length``, ``truncation_mode`` or ``overlong`` value."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an int of at least 2 tokens (or None), got {max_length!r}")
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {truncation_mode!r}")
    if overlong not in OVERLONG_ROWS:
        raise ValueError(f"overlong must be one of {', '.join(OVERLONG_ROWS)}, got {overlong!r}")


def _trainable(labels: list[int]) -> bool:
    return labels[1:].count(IGNORE_INDEX) < len(labels) - 1


def fit_to_length(
    record: Record,
    field: str,
    ids: list[int],
    labels: list[int],
    max_length: int | None,
    truncation_mode: str = "keep_start",
    overlong: str = "truncate",
) -> tuple[list[dict[str, list[int]]], str | None]:
    """``(examples, outcome)``: the row as zero or more ``{"input_ids", "labels"}`` examples of at most
    ``max_length`` tokens, and what was done to it (``None`` when it fitted; else ``"truncated"``,
    ``"split"`` or ``"dropped"``).

    Raises :class:`~pronghorn.errors.DataError` naming ``record``'s file, row and ``field`` when the row has no
    trainable token (before or after truncation; a split leaves out chunks without one), or is overlong under
    ``overlong="error"``.
    """
    n = len(ids)
    if not _trainable(labels):
        raise record.error(field, f"no trainable token (the row has {n} tokens, none of them trained)")
    if max_length is None or n <= max_length:
        return [{"input_ids": ids, "labels": labels}], None
    if overlong == "drop":
        return [], "dropped"
    if overlong == "error":
        raise record.error(
            field, f"the row has {n} tokens, more than max_length={max_length} ({spell('overlong', 'error')}); "
            f"raise {spell('max_length')} or choose {spell('overlong', 'truncate')}, 'split' or 'drop'"
        )
    if overlong == "split":
        chunks = [
            {"input_ids": ids[s:s + max_length], "labels": labels[s:s + max_length]} for s in range(0, n, max_length)
        ]
        return [c for c in chunks if _trainable(c["labels"])], "split"
    keep = slice(0, max_length) if truncation_mode == "keep_start" else slice(n - max_length, n)
    ids, labels = ids[keep], labels[keep]
    if not _trainable(labels):
        kept = "first" if truncation_mode == "keep_start" else "last"
        raise record.error(
            field,
            f"no trainable token after truncation to {max_length} tokens (truncation_mode={truncation_mode!r} "
            f"keeps the {kept} ones; the row has {n} tokens); raise {spell('max_length')}, shorten the row, or use "
            f"{spell('overlong', 'split')} or 'drop'",
        )
    return [{"input_ids": ids, "labels": labels}], "truncated"

