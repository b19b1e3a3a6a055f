"""GRPO generation under the memory budget (pronghorn/train/grpo_memory.py): the KV cache and logits of the
rollout are counted against the same budget as training; more rows than fit are decoded in rounds, and a budget
that cannot hold one completion stops with the smallest one that would."""

from __future__ import annotations

import pytest

from grpo_cases import grpo_trainer
from pronghorn.errors import PronghornError
from pronghorn.models.memory_plan import GIB, HEADROOM
from pronghorn.train import grpo_rollout
from pronghorn.train.grpo_memory import (SHRINK, generation_rows, kv_bytes_per_row, prefill_bytes, rows_at_once,
                                        sampling_bytes_per_row, sampling_copies)


def test_rows_per_round_from_the_budget():
    assert generation_rows(64, 10, None, 5) == 64  # no budget: everything at once
    budget = 1000
    usable = budget * (1 - HEADROOM) - 100
    assert generation_rows(200, 10, budget, 100) == int(usable // 10) == 86
    assert generation_rows(8, 10, budget, 100) == 8
    with pytest.raises(PronghornError, match=r"smallest budget that fits is .* GiB"):
        generation_rows(8, GIB, GIB, GIB // 2)


def test_the_prefill_and_a_sampling_step_are_never_held_at_once():
    """Rows fit when the cache plus the larger of the prefill's activations (once) and a sampling step's
    temporaries (per row) fit: the prefill is over before the first token is sampled."""
    budget, resident = 1000, 100
    usable = budget * (1 - HEADROOM) - resident  # 860
    assert generation_rows(200, 8, budget, resident, transient_row=2, transient=300) == int((usable - 300) // 8)
    assert generation_rows(200, 8, budget, resident, transient_row=4, transient=60) == int(usable // 12)
    with pytest.raises(PronghornError, match="smallest budget that fits is"):
        generation_rows(8, 8, budget, resident, transient=usable - 4)


def test_sampling_copies_follow_the_settings():
    assert sampling_copies() == 2.0  # a plain draw: the probabilities and the exponential draws
    assert sampling_copies(top_k=50) == 2.25
    assert sampling_copies(top_p=0.9) == sampling_copies(top_p=0.9, top_k=50, min_p=0.1) == 6.0
    assert sampling_copies(min_p=0.05) == 3.25
    assert sampling_copies(repetition_penalty=1.1) == 3.0


def test_kv_and_sampling_bytes_per_row(tmp_path):
    t = grpo_trainer(tmp_path)
    c = t.model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4  # fp32 K and V
    assert kv_bytes_per_row(t.model, 10) - kv_bytes_per_row(t.model, 9) == per_token
    assert kv_bytes_per_row(t.model, 0) == 0
    assert sampling_bytes_per_row(t.model) == c.vocab_size * (4 + 2 * 4)  # fp32 logits, two fp32 copies


def test_a_small_budget_decodes_in_rounds_and_a_tiny_one_stops_before_generating(tmp_path, monkeypatch):
    t = grpo_trainer(tmp_path)
    prompts = t.batch_prompts(0)
    rows = len(prompts) * t.cfg.num_generations
    resident = sum(p.numel() * p.element_size() for p in list(t.model.parameters()) + list(t.model.buffers()))
    tokens = max(len(p["prompt_ids"]) for p in prompts) + t.cfg.max_completion_length
    per_row = kv_bytes_per_row(t.model, tokens)
    assert prefill_bytes(t.model) > 3 * sampling_bytes_per_row(t.model)  # the prefill is the larger here
    budget = int((resident + prefill_bytes(t.model) + 2.5 * per_row) / (1 - HEADROOM))  # room for 2 rows at a time
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


def test_rounds_are_as_even_as_can_be(tmp_path, monkeypatch):
    """At most ``max_rows`` rows a round, in as few rounds as that allows, of one size where it divides: every
    round then reuses the first round's decoder (its static cache and CUDA graph are kept per batch size)."""
    t = grpo_trainer(tmp_path)
    prompts = [r["prompt_ids"] for r in t.batch_prompts(0)]
    calls, original = [], grpo_rollout.generate
    monkeypatch.setattr(grpo_rollout, "generate",
                        lambda m, ids, *a, **k: calls.append(len(ids)) or original(m, ids, *a, **k))
    rows = len(prompts) * 4
    assert rows == 8
    for max_rows, want in [(5, [4, 4]), (3, [3, 3, 2]), (8, [8]), (7, [4, 4]), (1, [1] * 8)]:
        calls.clear()
        out = grpo_rollout.rollout(t.model, t.tokenizer, prompts, 4, max_completion_length=3, seed=2,
                                   max_rows=max_rows)
        assert calls == want and len(out.completion_ids) == rows


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
    calls.clear()  # the next generation starts at the rows that fitted: no failed round again
    t.generate_batch(prompts, seed=2)
    assert calls and max(calls) == halvings[-1]
    monkeypatch.setattr(grpo_rollout, "generate", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(torch.OutOfMemoryError):  # one row a round does not fit: raised
        t.generate_batch(prompts, seed=1)


def test_a_failed_rounds_decoder_is_released_once_its_error_is_handled(tmp_path, monkeypatch):
    """The decoder's runner (KV cache, graph pool) is dropped after the handler has ended: inside it the error's
    traceback still holds the failed round's frames, and the memory could not be freed for the retry."""
    import sys

    import torch

    from pronghorn.train import grpo_trainer as trainer_module

    t = grpo_trainer(tmp_path)
    prompts = t.batch_prompts(0)
    events = []
    original = grpo_rollout.generate

    def small_device(m, ids, *a, **k):
        events.append(("generate", len(ids)))
        if len(ids) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(m, ids, *a, **k)

    monkeypatch.setattr(grpo_rollout, "generate", small_device)
    monkeypatch.setattr(trainer_module, "release", lambda m: events.append(("release", sys.exc_info()[0])))
    with pytest.warns(RuntimeWarning):
        t.generate_batch(prompts, seed=1)
    failed = [i for i, e in enumerate(events) if e[0] == "generate" and e[1] > 2]
    assert failed and all(events[i + 1] == ("release", None) for i in failed)  # no error being handled then


def test_a_training_forward_that_runs_out_of_memory_is_planned_again_for_less(tmp_path, monkeypatch):
    """The training forward's plan may miss what the device holds (session 13: GRPO under TRL's peak ran out of
    memory in its log-prob head). The micro-batch's forward is run again with its plan aiming at 0.9 times the
    last aim within the same budget, with a warning; nothing of it was accumulated, so loss and gradients equal a
    run that never ran out."""
    import torch

    from grpo_cases import fixed_batch
    from pronghorn.train import grpo_trainer as trainer_module
    from pronghorn.train.grpo_memory import TRAINING_RETRIES

    def step(t):
        batch = t.score_batch(*fixed_batch())
        loss, _ = t.accumulate_gradients(batch)
        grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
        t.model.zero_grad(set_to_none=True)
        return loss, grads

    want_loss, want = step(grpo_trainer(tmp_path / "a", max_memory="4GiB"))
    t = grpo_trainer(tmp_path / "b", max_memory="4GiB")
    original, budgets = trainer_module.packed_logps, []

    def runs_out_once_per_budget(model, *a, **k):
        budgets.append(model.model.plan_target)
        if budgets.count(budgets[-1]) == 1 and len(set(budgets)) < 3:  # the first forward of the first two budgets
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(model, *a, **k)

    monkeypatch.setattr(trainer_module, "packed_logps", runs_out_once_per_budget)
    with pytest.warns(RuntimeWarning, match="training forward ran out of memory") as seen:
        loss, got = step(t)
    assert len(seen) == 2 and t.model.model.plan_target == SHRINK * SHRINK
    assert t.model.model.memory_budget == 4 * GIB and budgets[:3] == [1.0, SHRINK, SHRINK * SHRINK]
    assert loss == want_loss and got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want)
    monkeypatch.setattr(trainer_module, "packed_logps",
                        lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(torch.OutOfMemoryError), pytest.warns(RuntimeWarning) as seen:
        step(t)
    assert len(seen) == TRAINING_RETRIES


def test_a_retry_that_no_plan_fits_says_so(tmp_path, monkeypatch):
    """After a training forward runs out of memory, the budget may fit no plan any more (what is resident grew):
    the planner's error (the smallest budget that would fit) comes out, saying that the step ran out of memory
    first."""
    import torch

    from grpo_cases import fixed_batch
    from pronghorn.models import decoder as decoder_module
    from pronghorn.train import grpo_trainer as trainer_module

    t = grpo_trainer(tmp_path, max_memory="4GiB")
    batch = t.score_batch(*fixed_batch())
    original, calls = trainer_module.packed_logps, []

    def out_of_memory_then_the_planner_refuses(model, *a, **k):
        calls.append((model.model.memory_budget, model.model.plan_target))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        monkeypatch.setattr(decoder_module, "device_budget", lambda device, limit: (1, "max_memory=0.00GiB"))
        return original(model, *a, **k)

    monkeypatch.setattr(trainer_module, "packed_logps", out_of_memory_then_the_planner_refuses)
    with pytest.raises(PronghornError, match=r"ran out of memory although its memory plan estimated it to fit.*"
                                             r"does not fit the memory budget"), pytest.warns(RuntimeWarning):
        t.accumulate_gradients(batch)
    assert calls == [(4 * GIB, 1.0), (4 * GIB, SHRINK)]


def test_grpo_plans_keep_a_tied_table_on_the_device_and_count_a_host_heads_copy(tmp_path, monkeypatch):
    """The trainer marks its model as decoding between steps, so the training plans never move a tied table
    (the head) to the host; a head the user put there is counted in generation as the transient device copy
    each decode forward makes of it."""
    import torch
    from torch import nn

    from pronghorn.models import decoder as decoder_module
    from pronghorn.train.grpo_memory import head_copy_bytes

    t = grpo_trainer(tmp_path)
    assert t.model.model.decodes_between_steps
    seen = []
    original = decoder_module.make_plan
    monkeypatch.setattr(decoder_module, "make_plan", lambda *a, **k: seen.append(k) or original(*a, **k))
    t.model.train()
    with torch.enable_grad():
        t.model.model.plan_step(1, 64, torch.float32, t.model.device, t.model.lm_head)
    assert seen and seen[-1]["host_tied_table"] is False
    assert head_copy_bytes(t.model) == 0
    w = t.model.lm_head.weight
    t.model.lm_head.weight = nn.Parameter(w.detach().to("meta"), requires_grad=False)  # a head off the device
    assert head_copy_bytes(t.model) == w.numel() * w.element_size()


def test_generation_counts_the_adapters_operands_the_decoder_keeps_on_a_gpu(tmp_path, monkeypatch):
    """The decode runner keeps every adapter's ``A`` and ``s * B`` in the compute dtype for a generate call
    (kernels/adapter_operands.GraphOperands) where the fast LoRA ops run, a GPU: counted there, 0 on a CPU (the
    reference path makes none)."""
    import torch

    from pronghorn.train import grpo_memory

    t = grpo_trainer(tmp_path)
    assert grpo_memory.operand_bytes(t.model) == 0
    monkeypatch.setattr(type(t.model), "device", property(lambda m: torch.device("cuda")))
    adapted = [m for m in t.model.modules() if getattr(m, "has_lora", False)]
    assert adapted
    want = sum(m.lora_A.numel() + m.lora_B.numel() for m in adapted) * 4  # the fp32 tiny model's dtype
    assert grpo_memory.operand_bytes(t.model) == want


def test_groups_of_one_prompt_hold_it_once_and_rounds_keep_whole_groups(tmp_path, monkeypatch):
    """With the rows in groups of one prompt, a row's cache is its new tokens, its share of the group's prompt and
    its part of one layer's whole keys and values (models/shared_prefix_cache.py); rounds hold whole groups."""
    t = grpo_trainer(tmp_path)
    c = t.model.config
    layer = 2 * c.num_key_value_heads * c.head_dim * 4  # one layer's fp32 K and V a token
    assert kv_bytes_per_row(t.model, 30, share=5, prompt_len=10) == (
        c.num_hidden_layers * layer * 20 + c.num_hidden_layers * layer * 10 // 5 + layer * 30)
    prompts = [r["prompt_ids"] for r in t.batch_prompts(0)]
    calls, original = [], grpo_rollout.generate
    monkeypatch.setattr(grpo_rollout, "generate",
                        lambda m, ids, *a, **k: calls.append(len(ids)) or original(m, ids, *a, **k))
    rows = [p for p in prompts for _ in range(4)]  # the trainer's repeated prompts: runs of 4
    for max_rows, want in [(7, [4, 4]), (5, [4, 4]), (8, [8]), (3, [3, 3, 2])]:
        calls.clear()
        grpo_rollout.rollout(t.model, t.tokenizer, rows, 1, max_completion_length=3, seed=2, max_rows=max_rows,
                             group=4)
        assert calls == want


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="parks CUDA state, decodes on a CUDA stream")
def test_a_tight_generation_parks_the_optimizer_and_decodes_on_one_stream_to_the_same_completions(tmp_path,
                                                                                                  monkeypatch):
    """When the rows do not fit at once, the trainer parks the optimizer's state on the host, frees the cuBLAS
    workspaces and decodes on the decode graph's stream alone; estimated again, here all rows fit: the same
    completions as without the budget, the state back on the GPU, and training goes on."""
    import torch

    from pronghorn.train import grpo_trainer as trainer_module

    runs = []
    for tight in (False, True):
        t = grpo_trainer(tmp_path / str(tight), device="cuda")
        t.train_step(t.step_examples(0))  # the optimizer has state now
        prompts, estimates = t.batch_prompts(1), []
        rows = len(prompts) * t.cfg.num_generations

        def at_once(model, budget, n, *terms, _tight=tight):
            estimates.append(terms)
            return n - 1 if _tight and len(estimates) == 1 else n
        monkeypatch.setattr(trainer_module, "rows_at_once", at_once)
        parked = []
        monkeypatch.setattr(trainer_module, "rollout", lambda *a, **k: parked.append(
            (t.parking.parked, k["one_stream"])) or grpo_rollout.rollout(*a, **k))
        batch = t.generate_batch(prompts, seed=7)
        assert parked == [(tight, tight)] and not t.parking.parked
        assert len(estimates) == (2 if tight else 1) and (not tight or estimates[1][-1] == 1)  # one workspace
        assert all(v.device.type == "cuda" for st in t.optimizer.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor) and v.dim())
        assert len(batch.rollout.completion_ids) == rows
        runs.append(batch.rollout.completion_ids)
        t.train_step(t.step_examples(1))
    assert runs[0] == runs[1]
