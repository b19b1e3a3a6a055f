"""Batches for preference training: chosen and rejected rows in ONE padded batch; KTO rows with their KL pairs.

A tokenized pair (see :func:`pronghorn.data.preference.tokenize_preference`) becomes two sequences,
``prompt + chosen`` and ``prompt + rejected``; a batch of B pairs is the 2B sequences ``[chosen_0 ..
chosen_{B-1}, rejected_0 .. rejected_{B-1}]`` so one forward scores both. ``labels`` hold the completion's
trained tokens and -100 elsewhere (prompt, masked template tail, padding), unshifted as for a causal LM.

KTO's reference point is estimated from mismatched pairs: as in TRL, completions are rotated by one within
each block of ``batch_size`` rows in dataset order, (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}), fixed once
(:func:`add_kl_completions`) so that precomputed reference log-probs stay valid whatever the batch order.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..kernels import IGNORE_INDEX
from .collate import pad_batch

__all__ = ["add_kl_completions", "collate_kto", "collate_preference", "sequence"]


def sequence(prompt_ids: Sequence[int], completion_ids: Sequence[int], mask: Sequence[int]) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` of prompt + completion, labels only on the completion's masked-in tokens."""
    labels = [IGNORE_INDEX] * len(prompt_ids) + [t if m else IGNORE_INDEX for t, m in zip(completion_ids, mask)]
    return {"input_ids": list(prompt_ids) + list(completion_ids), "labels": labels}


def collate_preference(rows: Sequence[Mapping[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None):
    """Pairs -> one batch of 2B rows (chosen first, then rejected)."""
    seqs = [sequence(r["prompt_ids"], r["chosen_ids"], r["chosen_mask"]) for r in rows]
    seqs += [sequence(r["prompt_ids"], r["rejected_ids"], r["rejected_mask"]) for r in rows]
    return pad_batch(seqs, pad_token_id, pad_to_multiple_of)


def add_kl_completions(rows: Sequence[Mapping[str, Any]], batch_size: int) -> list[dict]:
    """Copies of KTO rows with ``kl_completion_ids`` / ``kl_completion_mask``: the completion of the previous
    row of the same block of ``batch_size`` rows (the last row's for the first)."""
    out = []
    for start in range(0, len(rows), batch_size):
        block = rows[start:start + batch_size]
        for i, r in enumerate(block):
            other = block[i - 1]
            out.append({**r, "kl_completion_ids": other["completion_ids"],
                        "kl_completion_mask": other["completion_mask"]})
    return out


def collate_kto(rows: Sequence[Mapping[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None):
    """KTO rows -> ``(batch, kl_batch)``: (prompt_i, completion_i) and (prompt_i, kl_completion_i)."""
    batch = pad_batch([sequence(r["prompt_ids"], r["completion_ids"], r["completion_mask"]) for r in rows],
                      pad_token_id, pad_to_multiple_of)
    kl = pad_batch([sequence(r["prompt_ids"], r["kl_completion_ids"], r["kl_completion_mask"]) for r in rows],
                   pad_token_id, pad_to_multiple_of)
    return batch, kl
