"""GRPO's generation phase: G sampled completions per prompt from pronghorn's own decoder, in one batch.

The P prompts' ids are repeated G times each (a group is G consecutive rows), left-padded into one batch and
continued by :func:`pronghorn.infer.generate.generate` (sampled with ``temperature`` / ``top_k`` / ``top_p`` /
``min_p`` in transformers' order, a KV cache; on CUDA the static cache with the decode step replayed as a CUDA
graph, LoRA adapters live and unmerged), from a private generator seeded per generation batch (a resumed run
draws the same way).

A completion ends with its first EOS token (kept, as TRL's completion mask does), or with the token that
completes a stop string (kept), or after ``max_completion_length`` tokens (then it is ``truncated``); what the
decoder wrote after the end (padding of a finished row) is cut off. Completions are decoded without special
tokens; for a conversational prompt a completion is ``[{"role": "assistant", "content": text}]``, as TRL.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..infer.generate import generate
from ..infer.static_decode import warmup_stream

CACHE_MULTIPLE = 16  # the static cache of a round is used once (released after the rollout): little rounding


@dataclass
class Rollout:
    """One generation batch: per completion (P * G of them, grouped), its prompt's and its own token ids."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list  # decoded: str, or [{"role": "assistant", "content": str}]
    truncated: list[bool]
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    def take(self, order: Sequence[int]) -> "Rollout":
        """The completions in ``order`` (a permutation, or any selection of indices)."""
        return Rollout(*([v[i] for i in order] for v in (self.prompt_ids, self.completion_ids, self.completions,
                                                          self.truncated)), self.seconds)


def eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the model's generation / config EOS ids and the tokenizer's."""
    found: list[int] = []
    gen = getattr(model, "generation_config", None) or {}
    for source in (gen.get("eos_token_id") if isinstance(gen, dict) else getattr(gen, "eos_token_id", None),
                   getattr(model.config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for e in ([] if source is None else [source] if isinstance(source, int) else list(source)):
            if e not in found:
                found.append(int(e))
    return found


def _stop_index(ids: list[int], stops: Sequence[str], tokenizer: Any) -> int | None:
    """The first index k such that ``ids[:k + 1]`` decodes to text containing a stop string (binary search:
    a longer prefix's text contains a shorter one's)."""
    def hit(k: int) -> bool:
        text = tokenizer.decode(ids[:k + 1], skip_special_tokens=False)
        return any(s in text for s in stops)

    if not ids or not hit(len(ids) - 1):
        return None
    lo, hi = 0, len(ids) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
    return lo


def completion_end(ids: list[int], eos: Sequence[int], stops: Sequence[str], tokenizer: Any) -> tuple[int, bool]:
    """(the completion's length, whether it ended without EOS / stop string) for ``ids`` as the decoder wrote them."""
    end = next((i + 1 for i, t in enumerate(ids) if t in eos), None)
    if stops:
        k = _stop_index(ids if end is None else ids[:end - 1], stops, tokenizer)
        if k is not None:
            end = k + 1
    return (len(ids), True) if end is None else (end, False)


def left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [len(rows), longest], padding on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def rollout(model: nn.Module, tokenizer: Any, prompt_ids: Sequence[list[int]], num_generations: int, *,
            max_completion_length: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
            min_p: float = 0.0, stop_strings: Sequence[str] | None = None, seed: int | None = None,
            conversational: bool = False, max_rows: int | None = None, group: int = 1,
            one_stream: bool = False) -> Rollout:
    """``num_generations`` completions of each prompt (module docstring); at most ``max_rows`` rows decoded at
    once (the memory budget: train/grpo_memory.py), in rounds as even as can be, round ``i`` seeded with
    ``seed + i``. ``group``: ``prompt_ids`` come in runs of that many equal prompts (the trainer's repeated
    prompts; ``num_generations`` makes its own runs): rounds hold whole runs where ``max_rows`` allows, so that
    the decoder holds each run's prompt once (models/shared_prefix_cache.py). ``one_stream`` (CUDA): decode on
    the decode graph's own stream, the prefill included, so that generation holds one cuBLAS workspace, not two
    (:func:`decoding_stream`)."""
    rows = [list(p) for p in prompt_ids for _ in range(num_generations)]
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    ids, mask = left_pad(rows, pad)
    device = model.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    unit = group * num_generations  # rows of one prompt
    if len(rows) % unit or (max_rows or len(rows)) < unit:
        unit = 1
    runs = len(rows) // unit
    rounds = -(-runs // ((max_rows or len(rows)) // unit))
    step = -(-runs // rounds) * unit  # even rounds: one batch size, so every round reuses the first one's graph
    new = []
    with decoding_stream(device if one_stream else None):
        for i, start in enumerate(range(0, len(rows), step)):
            new += _round(model, tokenizer, ids[start:start + step].to(device), mask[start:start + step].to(device),
                          max_completion_length, temperature, top_p, top_k, min_p, eos, pad, stop_strings,
                          None if seed is None else seed + i)
    seconds = time.perf_counter() - t0
    completion_ids, truncated = [], []
    for r in new:
        end, cut = completion_end(r, eos, stop_strings or (), tokenizer)
        completion_ids.append(r[:end])
        truncated.append(cut)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    return Rollout(rows, completion_ids, completions, truncated, seconds)


def _round(model, tokenizer, ids, mask, max_completion_length, temperature, top_p, top_k, min_p, eos, pad,
           stop_strings, seed) -> list[list[int]]:
    """One round's new tokens (with padding after a stop), copied to the host once the decoder is done."""
    out = generate(model, ids, mask, max_new_tokens=max_completion_length, do_sample=True, temperature=temperature,
                   top_p=top_p, top_k=top_k, min_p=min_p, eos_token_id=eos, pad_token_id=pad,
                   stop_strings=list(stop_strings) if stop_strings else None, tokenizer=tokenizer, seed=seed,
                   cache_multiple=CACHE_MULTIPLE)
    return out[:, ids.shape[1]:].tolist()


@contextlib.contextmanager
def decoding_stream(device: torch.device | None):
    """Run the body on the decode graph's warm-up and capture stream (``static_decode.warmup_stream``) of
    ``device`` (None or not CUDA: as is): no cuBLAS call then runs on the current stream, whose workspace the
    trainer frees before generating. What the body allocates belongs to that stream's pool and is given back
    by the trainer's ``empty_cache`` after it; the body's results reach the host (``tolist``), and the current
    stream waits for the decode stream at the end."""
    if device is None or device.type != "cuda":
        yield
        return
    stream, current = warmup_stream(device), torch.cuda.current_stream(device)
    stream.wait_stream(current)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        current.wait_stream(stream)
