"""Pack tokenized examples into rows of at most ``max_length`` tokens, padding-free.

Each packed row concatenates whole sequences and carries ``position_ids`` that restart at 0 for every
sequence; the model derives a document mask from the restarts so attention never crosses a boundary
(:func:`pronghorn.models.attention.build_attention_mask`). The label at each sequence start is set to -100:
the model shifts labels (the label at position ``i`` is predicted from position ``i - 1``), so that label
would otherwise be predicted from the previous sequence's last token. A sequence run alone never uses its
first label either, so packed and unpacked losses are the same.

Strategies: ``"bfd"`` (best-fit decreasing: whole sequences, reordered, into as few rows as fit) and
``"chunk"`` (concatenate-and-chunk, for pretraining text: the sequences in order, cut into rows of exactly
``max_length`` tokens, the last row possibly shorter; a document cut at a row end continues in the next row
as a new sequence, its positions restarting at 0, since the next row cannot see its beginning).
"""

from __future__ import annotations

import bisect
from typing import Any, Mapping, Sequence

import torch

from ..errors import DataError, spell
from ..kernels import IGNORE_INDEX

__all__ = ["OVERLONG_POLICIES", "PACKING_STRATEGIES", "collate_packed", "pack_examples"]

PACKING_STRATEGIES = ("bfd", "chunk")
OVERLONG_POLICIES = ("error", "truncate", "split", "drop")


def _as_list(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def _sequences(examples, max_length: int, overlong: str, stats: dict,
               truncation_mode: str = "keep_start") -> list[tuple[list[int], list[int]]]:
    seqs = []
    for i, ex in enumerate(examples):
        ids = _as_list(ex["input_ids"])
        labels = _as_list(ex["labels"]) if "labels" in ex else list(ids)
        if len(labels) != len(ids):
            raise DataError(f"example {i}: input_ids has {len(ids)} tokens but labels has {len(labels)}")
        if not ids:
            raise DataError(f"example {i}: input_ids is empty")
        if len(ids) <= max_length:
            seqs.append((ids, labels))
        elif overlong == "error":
            raise DataError(
                f"example {i} has {len(ids)} tokens, more than max_length={max_length}; truncate it first "
                f"(or pass {spell('overlong', 'truncate')}, 'split' or 'drop')"
            )
        elif overlong == "truncate":
            stats["truncated"] += 1
            keep = slice(0, max_length) if truncation_mode == "keep_start" else slice(len(ids) - max_length, None)
            seqs.append((ids[keep], labels[keep]))
        elif overlong == "split":  # consecutive chunks, each its own sequence
            stats["split"] += 1
            seqs.extend((ids[s:s + max_length], labels[s:s + max_length]) for s in range(0, len(ids), max_length))
        else:
            stats["dropped"] += 1
    return seqs


def _best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sequence indices. Longest first (ties by index); each goes into the fullest bin it fits
    (ties: the earliest bin), else a new bin. Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining space, bin index)
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, b = free.pop(j)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    return bins


def _chunks(lengths: list[int], capacity: int) -> list[tuple[int, int, int, int]]:
    """Concatenate-and-chunk: ``(sequence, start, end, row)`` pieces, in order, filling rows of ``capacity``."""
    pieces, row, free = [], 0, capacity
    for i, n in enumerate(lengths):
        start = 0
        while start < n:
            if free == 0:
                row, free = row + 1, capacity
            take = min(free, n - start)
            pieces.append((i, start, start + take, row))
            start, free = start + take, free - take
    return pieces


def _rows_of(pieces: list[tuple[int, int, int, int]]) -> list[list[int]]:
    rows: list[list[int]] = []
    for k, (*_, row) in enumerate(pieces):
        if row == len(rows):
            rows.append([])
        rows[row].append(k)
    return rows


def pack_examples(
    examples: Sequence[Mapping[str, Any]],
    max_length: int,
    strategy: str = "bfd",
    overlong: str = "error",
    return_stats: bool = False,
    truncation_mode: str = "keep_start",
):
    """Pack ``examples`` (each with ``input_ids`` and optional ``labels``, lists or 1-D tensors) into rows of
    at most ``max_length`` tokens by best-fit decreasing.

    Returns a list of rows ``{"input_ids", "labels", "position_ids"}`` (lists of ints); every token of every
    kept sequence appears exactly once. ``overlong`` decides what happens to an example longer than
    ``max_length``: ``"error"`` (a :class:`DataError`), ``"truncate"`` (keep the first ``max_length`` tokens, or
    the last ones with ``truncation_mode="keep_end"``),
    ``"split"`` (consecutive chunks, each packed as its own sequence) or ``"drop"``. With ``return_stats``
    the result is ``(rows, stats)``, ``stats`` counting sequences, rows, tokens and truncated / split /
    dropped examples. ``strategy="chunk"`` concatenates the examples in order and cuts rows of exactly
    ``max_length`` tokens instead (``overlong`` does not apply: long documents continue across rows).
    """
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"strategy must be one of {PACKING_STRATEGIES}, got {strategy!r}")
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode must be keep_start or keep_end, got {truncation_mode!r}")
    stats = {"truncated": 0, "split": 0, "dropped": 0}
    if strategy == "chunk":
        seqs = _sequences(examples, 1 << 62, "error", stats)
        bins = _chunks([len(ids) for ids, _ in seqs], max_length)
        seqs = [(seqs[i][0][a:b], seqs[i][1][a:b]) for i, a, b, _ in bins]
        bins = _rows_of(bins)
    else:
        seqs = _sequences(examples, max_length, overlong, stats, truncation_mode)
        bins = _best_fit_decreasing([len(ids) for ids, _ in seqs], max_length)
    rows = []
    for members in bins:
        input_ids, labels, position_ids = [], [], []
        for i in members:
            ids, lab = seqs[i]
            input_ids += ids
            labels.append(IGNORE_INDEX)
            labels += lab[1:]
            position_ids += range(len(ids))
        rows.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
    if not return_stats:
        return rows
    tokens = sum(len(r["input_ids"]) for r in rows)
    stats.update(sequences=len(seqs), rows=len(rows), tokens=tokens,
                 fill=tokens / (len(rows) * max_length) if rows else 0.0)
    return rows, stats


def collate_packed(
    rows: Sequence[Mapping[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Stack packed rows into ``input_ids``, ``labels`` and ``position_ids`` LongTensors ``(batch, length)``,
    with no ``attention_mask`` (padding-free).

    Shorter rows are padded at the end with one extra "sequence" (positions restarting at 0, labels -100),
    so the document mask keeps real tokens from attending to it.
    """
    if not rows:
        raise ValueError("collate_packed needs at least one row")
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of}")
    length = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        if not (len(r["labels"]) == len(r["position_ids"]) == n):
            raise ValueError(f"row {b}: input_ids, labels and position_ids must have equal lengths")
        input_ids[b, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
        position_ids[b, :n] = torch.as_tensor(r["position_ids"], dtype=torch.long)
        position_ids[b, n:] = torch.arange(length - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
