"""Pad tokenized examples into a batch of LongTensors.

Padding positions get ``attention_mask == 0`` and ``labels == -100``. Masks are built from each example's
length, never by comparing token ids with the pad id (which may equal EOS, a token that must be trained).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..kernels import IGNORE_INDEX

__all__ = ["batch_to_device", "count_trained_tokens", "pad_batch", "padding_id"]


def padding_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS, else 0 (labels mask it either way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


def count_trained_tokens(example: Mapping[str, Any]) -> int:
    """Labels that count in the loss after the next-token shift (a row's first position is never predicted;
    packed rows carry -100 where each further sequence starts)."""
    return sum(1 for y in list(example["labels"])[1:] if y != IGNORE_INDEX)


def pad_batch(
    examples: Sequence[Mapping[str, Any]],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Stack ``examples`` (each with ``input_ids`` and ``labels``, lists or 1-D tensors) into
    ``input_ids``, ``attention_mask`` and ``labels`` LongTensors of shape ``(batch, length)``.

    ``length`` is the longest example, rounded up to ``pad_to_multiple_of`` when given. ``labels`` defaults to
    ``input_ids`` for an example without it.
    """
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of}")

    rows = []
    for i, ex in enumerate(examples):
        ids = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        labels = torch.as_tensor(ex["labels"] if "labels" in ex else ids, dtype=torch.long)
        if ids.ndim != 1 or labels.shape != ids.shape:
            raise ValueError(
                f"example {i}: input_ids and labels must be 1-D and of equal length, got shapes "
                f"{tuple(ids.shape)} and {tuple(labels.shape)}"
            )
        if ids.numel() == 0:
            raise ValueError(f"example {i}: input_ids is empty")
        rows.append((ids, labels))

    length = max(ids.numel() for ids, _ in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    labels_out = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, labels) in enumerate(rows):
        n = ids.numel()
        cols = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[b, cols] = ids
        attention_mask[b, cols] = 1
        labels_out[b, cols] = labels
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels_out}


def batch_to_device(batch: Mapping[str, torch.Tensor | None], device) -> dict[str, torch.Tensor | None]:
    """A collated host batch on ``device`` without waiting for the device: on CUDA each tensor goes through
    pinned memory with a non-blocking copy (a copy from pageable memory synchronizes the stream). An all-ones
    ``attention_mask`` becomes None, which means the same to the models (no padding): checked here on the host,
    where it is free, instead of by the model on the device (a host sync per forward)."""
    device = torch.device(device)
    out: dict[str, torch.Tensor | None] = {}
    for k, v in batch.items():
        if v is not None and v.device.type == "cpu":
            if k == "attention_mask" and bool(v.all()):
                v = None
            elif device.type == "cuda":
                v = v.pin_memory().to(device, non_blocking=True)
        out[k] = v if v is None else v.to(device)
    return out
