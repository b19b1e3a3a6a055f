"""Held-out loss and perplexity: the token-weighted mean next-token negative log-likelihood over every predicted
token of a dataset (not a mean of per-batch means), and its exponential.

A token is predicted when its label is not ``-100`` and it is not the first of its row (labels are not shifted:
the model shifts them; packed rows carry ``-100`` where each further sequence starts). Raw-text blocks (:mod:`pronghorn.data.raw_text`) and packed rows are evaluated
as packed rows, their documents kept apart; other examples are padded. The model runs in eval mode (no dropout)
and without gradients; each batch returns its loss sum (``num_items_in_batch=1``), accumulated in float64.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..data.collate import batch_to_device, count_trained_tokens, pad_batch, padding_id
from ..data.formats import RAW_TEXT
from ..data.packing import collate_packed
from ..data.raw_text import raw_text_blocks
from ..data.records import load_records, records_from_rows
from ..data.tokenize import DEFAULT_MAX_LENGTH, progress_batches, tokenize_dataset
from ..errors import PronghornError

__all__ = ["EvalResult", "evaluate_examples", "evaluate_perplexity"]


@dataclass(frozen=True)
class EvalResult:
    """``loss``: mean NLL per predicted token (nats); ``perplexity``: ``exp(loss)``; ``tokens``: how many."""

    loss: float
    perplexity: float
    tokens: int

    def metrics(self) -> dict[str, float | int]:
        """The metrics-row entries (Hugging Face Trainer's names)."""
        return {"eval_loss": self.loss, "eval_perplexity": self.perplexity, "eval_tokens": self.tokens}


@torch.no_grad()
def evaluate_examples(model: torch.nn.Module, examples: Sequence[Mapping[str, Any]], batch_size: int,
                      pad_id: int, *, forward: Callable[..., Any] | None = None, device=None,
                      progress: bool = False) -> EvalResult:
    """Loss and perplexity of ``model`` over tokenized ``examples`` (``{"input_ids", "labels"}``, plus
    ``position_ids`` for packed rows / raw-text blocks), ``batch_size`` rows at a time. ``forward``: what runs a
    batch (default: the model; the trainer passes its data-parallel wrapper)."""
    if not examples:
        raise PronghornError("the evaluation set is empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    tokens = sum(count_trained_tokens(e) for e in examples)
    if tokens == 0:
        raise PronghornError("the evaluation set has no predicted token (every label is masked)")
    forward = forward or model
    device = device or _device(model)
    extra = {"return_logits": False} if hasattr(model, "memory_plan") else {}  # pronghorn's models: loss only
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
        for chunk in progress_batches(batches, len(examples), "Evaluating", progress):
            packed = "position_ids" in chunk[0]
            batch = collate_packed(chunk, pad_id) if packed else pad_batch(chunk, pad_id)
            out = forward(**batch_to_device(batch, device), num_items_in_batch=1, **extra)
            total += float(out.loss.double())  # the batch's loss sum
    finally:
        model.train(was_training)
    loss = total / tokens
    return EvalResult(loss, math.exp(loss) if loss < 700 else math.inf, tokens)


def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    data: str | os.PathLike | Sequence[str | Mapping[str, Any]],
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 8,
    *,
    data_format: str | None = None,
    sample_by: str = "line",
    train_on: str = "all_assistant",
    overlong: str = "truncate",
    progress: bool = True,
) -> EvalResult:
    """Held-out loss and perplexity of ``model`` on ``data``: a dataset file, folder or glob pattern, or a list
    of rows (strings are raw-text documents). ``data_format="raw_text"`` cuts the documents into ``max_length``
    blocks (as continued pretraining trains); otherwise rows are tokenized as for training (format detected
    unless given; ``train_on`` / ``overlong`` as the training settings), so chat rows score their assistant
    turns. Already tokenized examples (dicts with ``input_ids``) are evaluated as they are."""
    rows = list(data) if not isinstance(data, (str, os.PathLike)) else None
    if rows and isinstance(rows[0], Mapping) and "input_ids" in rows[0] and "labels" in rows[0]:
        examples = rows
    elif data_format == RAW_TEXT or (rows and all(isinstance(r, str) for r in rows)):
        examples = raw_text_blocks(data, tokenizer, max_length, sample_by=sample_by, progress=progress)
    else:
        records = load_records(data, sample_by=sample_by) if rows is None else records_from_rows(rows)
        examples = tokenize_dataset(records, tokenizer, data_format, max_length, train_on=train_on,
                                    overlong=overlong, progress=progress)
    return evaluate_examples(model, examples, batch_size, padding_id(tokenizer), progress=progress)


def _device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)  # not the first parameter: an offloaded embedding is on the host
    return device if isinstance(device, torch.device) else next(model.parameters()).device
