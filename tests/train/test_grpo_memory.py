"""GRPO generation under the memory budget (pronghorn/train/grpo_memory.py): the KV cache and logits of the
rollout are counted against the same budget as training; more rows than fit are decoded in rounds, and a budget
that cannot hold one completion stops with the smallest one that would."""

from __future__ import annotations

import pytest

from grpo_cases import grpo_trainer
from pronghorn.errors import PronghornError
from pronghorn.models.memory_plan import GIB, HEADROOM
from pronghorn.train import grpo_rollout
from pronghorn.train.grpo_memory import bytes_per_row, generation_rows, prefill_bytes, rows_at_once


def test_rows_per_round_from_the_budget():
    assert generation_rows(64, 10, None, 5) == 64  # no budget: everything at once
    budget = 1000
    usable = budget * (1 - HEADROOM) - 100
    assert generation_rows(200, 10, budget, 100) == int(usable // 10) == 86
    assert generation_rows(8, 10, budget, 100) == 8
    with pytest.raises(PronghornError, match=r"smallest budget that fits is .* GiB"):
        generation_rows(8, GIB, GIB, GIB // 2)


def test_bytes_per_row_counts_every_layers_cache_and_the_logits(tmp_path):
    t = grpo_trainer(tmp_path)
    c = t.model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4  # fp32 K and V
    assert bytes_per_row(t.model, 10) - bytes_per_row(t.model, 9) == per_token
    assert bytes_per_row(t.model, 0) == 4 * c.vocab_size * 4


def test_a_small_budget_decodes_in_rounds_and_a_tiny_one_stops_before_generating(tmp_path, monkeypatch):
    t = grpo_trainer(tmp_path)
    prompts = t.batch_prompts(0)
    rows = len(prompts) * t.cfg.num_generations
    resident = sum(p.numel() * p.element_size() for p in list(t.model.parameters()) + list(t.model.buffers()))
    resident += prefill_bytes(t.model)  # one prefill forward's activations beside the cache
    tokens = max(len(p["prompt_ids"]) for p in prompts) + t.cfg.max_completion_length
    per_row = bytes_per_row(t.model, tokens)
    budget = int((resident + 2.5 * per_row) / (1 - HEADROOM))  # room for 2 rows at a time
    assert rows_at_once(t.model, str(budget), rows, tokens) == 2
    calls = []
    original = grpo_rollout.generate
    monkeypatch.setattr(grpo_rollout, "generate",
                        lambda m, ids, *a, **k: calls.append(len(ids)) or original(m, ids, *a, **k))
    t.cfg.max_memory = str(budget)
    batch = t.generate_batch(prompts, seed=1)
    assert calls == [2] * (rows // 2) + ([rows % 2] if rows % 2 else [])
    assert len(batch.rollout.completion_ids) == rows
    t.cfg.max_memory = str(resident)  # not even one completion's cache fits
    calls.clear()
    with pytest.raises(PronghornError, match="GRPO generation does not fit max_memory"):
        t.generate_batch(prompts, seed=1)
    assert calls == []


def test_without_a_budget_the_rollout_is_one_round_as_before(tmp_path):
    t = grpo_trainer(tmp_path)
    prompts = [r["prompt_ids"] for r in t.batch_prompts(0)]
    one = grpo_rollout.rollout(t.model, t.tokenizer, prompts, 3, max_completion_length=5, seed=4)
    same = grpo_rollout.rollout(t.model, t.tokenizer, prompts, 3, max_completion_length=5, seed=4, max_rows=10**6)
    assert one.completion_ids == same.completion_ids


def test_a_round_that_runs_out_of_memory_is_decoded_again_in_smaller_rounds(tmp_path, monkeypatch):
    """Where the estimate misses what the GPU holds, a round that runs out of memory is decoded again with half
    the rows a round (a warning says so) instead of ending the run; one row that does not fit still raises."""
    import torch

    t = grpo_trainer(tmp_path)
    prompts = t.batch_prompts(0)
    rows = len(prompts) * t.cfg.num_generations
    calls = []
    original = grpo_rollout.generate

    def small_device(m, ids, *a, **k):
        calls.append(len(ids))
        if len(ids) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(m, ids, *a, **k)

    monkeypatch.setattr(grpo_rollout, "generate", small_device)
    with pytest.warns(RuntimeWarning, match=r"ran out of memory decoding \d+ completions at once") as seen:
        batch = t.generate_batch(prompts, seed=1)
    halvings = [rows]
    while halvings[-1] > 2:
        halvings.append(halvings[-1] // 2)
    assert len(seen) == len(halvings) - 1
    assert all(f"decoding {n} completions at once" in str(w.message) for n, w in zip(halvings, seen))
    assert len(batch.rollout.completion_ids) == rows and calls[:len(halvings) - 1] == halvings[:-1]
    monkeypatch.setattr(grpo_rollout, "generate", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(torch.OutOfMemoryError), pytest.warns(RuntimeWarning):
        t.generate_batch(prompts, seed=1)
