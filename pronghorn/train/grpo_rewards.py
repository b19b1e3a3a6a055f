"""Scoring completions: call each reward function once on the whole generation batch, TRL's way.

A function gets ``prompts`` and ``completions`` (one entry per completion, a prompt repeated for each of its
G completions), ``completion_ids`` and every other dataset column as a keyword list aligned with them. It
returns one number per completion, or None where it does not apply (NaN here: left out of the weighted sum,
see :mod:`.grpo_advantages`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from ..errors import PronghornError
from .rewards import reward_name, resolve_reward

SKIPPED_COLUMNS = ("prompt", "prompt_ids", "completion", "completion_ids")


def resolve_rewards(funcs: Sequence, weights: Sequence[float] | None) -> tuple[list[Callable], torch.Tensor]:
    """(callables, weights [F]) from ``reward_funcs`` and ``reward_weights`` (None: ones)."""
    if not funcs:
        raise PronghornError("GRPO needs reward_funcs: built-in names (gsm8k_format, gsm8k_correct), "
                             "'module:function' import paths or (Python) callables")
    fns = [resolve_reward(f) for f in funcs]
    if weights is None:
        weights = [1.0] * len(fns)
    if len(weights) != len(fns):
        raise PronghornError(f"reward_weights has {len(weights)} values for {len(fns)} reward_funcs")
    return fns, torch.tensor([float(w) for w in weights], dtype=torch.float32)


def score(fns: Sequence[Callable], rows: Sequence[dict], completions: list, completion_ids: list[list[int]]
          ) -> torch.Tensor:
    """[N, F] float32 rewards of N completions, ``rows[n]`` the dataset row completion n answers."""
    columns = {k: [r[k] for r in rows] for k in rows[0] if k not in SKIPPED_COLUMNS}
    prompts = [r["prompt"] for r in rows]
    out = torch.empty(len(rows), len(fns), dtype=torch.float32)
    for j, fn in enumerate(fns):
        values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        values = list(values) if values is not None else []
        if len(values) != len(rows):
            raise PronghornError(f"reward function {reward_name(fn)!r} returned {len(values)} rewards for "
                                 f"{len(rows)} completions (one per completion, None where it does not apply)")
        out[:, j] = torch.tensor([_reward(v, fn, i) for i, v in enumerate(values)], dtype=torch.float32)
    return out


def _reward(value: Any, fn: Callable, index: int) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PronghornError(f"reward function {reward_name(fn)!r} returned {value!r} for completion {index}; "
                             "expected a number or None") from None
