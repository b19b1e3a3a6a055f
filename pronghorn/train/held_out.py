"""The trainer's held-out set: ``eval_data`` (a dataset tokenized like the training data) or ``eval_split`` (a
seeded fraction of the training rows, held out before raw-text documents are cut into blocks or rows are packed,
so no document or row is on both sides)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..data.records import load_records
from ..data.tokenize import tokenize_dataset
from ..errors import PronghornError, spell
from .config import TrainConfig

__all__ = ["split_held_out", "held_out_examples"]


def split_held_out(examples: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)``: ``round(fraction * n)`` examples (at least one) drawn with ``seed``, the rest kept for
    training; each side keeps the original order."""
    n = len(examples)
    held = max(1, round(fraction * n))
    if held >= n:
        raise PronghornError(f"{spell('eval_split', fraction)} of {n} training rows leaves none to train on; "
                             "give more rows or a smaller fraction")
    chosen = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:held].tolist())
    return ([e for i, e in enumerate(examples) if i not in chosen],
            [e for i, e in enumerate(examples) if i in chosen])


def held_out_examples(cfg: TrainConfig, tokenizer: Any, train_examples: list[dict],
                      progress: bool = False) -> tuple[list[dict], list[dict] | None]:
    """``(train_examples, eval_examples)`` as the config says: ``eval_data`` read (``sample_by``) and tokenized
    with the training data's settings, or ``eval_split`` taken out of ``train_examples``; ``None`` without
    either."""
    if cfg.eval_split:
        return split_held_out(train_examples, cfg.eval_split, cfg.seed)
    if not cfg.eval_data:
        return train_examples, None
    records = load_records(cfg.eval_data, sample_by=cfg.sample_by)
    examples = tokenize_dataset(records, tokenizer, cfg.data_format, cfg.max_length, train_on=cfg.train_on,
                                progress=progress, truncation_mode=cfg.truncation_mode, overlong=cfg.overlong,
                                skip_bad_rows=cfg.skip_bad_rows)
    return train_examples, examples
