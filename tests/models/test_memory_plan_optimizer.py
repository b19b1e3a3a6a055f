"""The memory plan counts what the optimizer holds (models/memory_plan.py ``OptimizerFootprint``): under full
fine-tuning a gradient and the optimizer's state for every weight; with the step in the backward pass only the
largest layer's gradients and the tables'; LoRA as before."""

import torch

from full_finetune_cases import full_model, full_trainer
from helpers import random_examples, tiny_lora_model
from pronghorn.models.memory_plan import OptimizerFootprint, step_sizes
from pronghorn.train.full_finetune import optimizer_footprint

CPU = torch.device("cpu")


def _to_come(model, footprint=OptimizerFootprint()) -> int:
    return step_sizes(model.model, 2, 16, model.dtype, CPU, model.lm_head, optimizer=footprint).to_come


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_full_finetuning_counts_a_gradient_and_the_state_of_every_weight():
    _, model = full_model()
    params = list(model.parameters())  # the tied table once
    n, grads = sum(p.numel() for p in params), _bytes(params)
    assert _to_come(model) == grads + 8 * n  # torch AdamW: two fp32 moments
    assert _to_come(model, optimizer_footprint("adamw_8bit", False)) == grads + 2 * n
    _, bf16 = full_model(torch.bfloat16)
    assert _to_come(bf16, optimizer_footprint("adamw_bf16_sr", False)) == 2 * n + 8 * n
    assert _to_come(bf16, optimizer_footprint("adamw_bf16_master", False)) == 2 * n + 12 * n


def test_the_step_in_the_backward_counts_one_layer_of_gradients_and_the_tables():
    _, model = full_model()
    n = sum(p.numel() for p in model.parameters())
    layer = _bytes(model.model.layers[0].parameters())
    outside = _bytes([model.model.embed_tokens.weight, model.model.norm.weight])
    assert _to_come(model, optimizer_footprint("adamw_torch", True)) == layer + outside + 8 * n
    assert layer + outside < _bytes(model.parameters())


def test_the_trainer_tells_the_plan_its_optimizer(tmp_path):
    t = full_trainer(tmp_path, random_examples(4), optimizer_in_backward=True, optim="adamw_bf16_sr")
    assert t.model.model.optimizer_footprint == OptimizerFootprint(state_bytes=8, grads_in_backward=True)


def test_lora_counts_its_adapters_only():
    model = tiny_lora_model()
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert _to_come(model) == _bytes(adapters) + 8 * sum(p.numel() for p in adapters)


def test_gradients_applied_in_the_backward_lower_the_peak_where_the_backward_holds_it():
    """The step in the backward holds one layer's gradients instead of every layer's below the one at work. That
    lowers the estimate where the bottom layer's backward is the peak (little kept, big layers: every layer
    recomputed), not where the loss is (everything kept: on the H200 the 1B full fine-tuning step peaked at 22.94 GiB
    with and without optimizer_in_backward, docs/benchmarks.md session 12)."""
    from dataclasses import replace

    from pronghorn.models.memory_plan import MemoryPlan, StepSizes, estimate_peak, step_moments

    layers, grads, tables = 4, 50, 100
    ordinary = StepSizes(layers=layers, attn_block=10, mlp_block=20, tiled_block=2, layer_input=2, backward_extra=5,
                         tiled_token=0, dense_layer=0, tokens=8, vocab=10, head_itemsize=2, loss_extra=1,
                         resident=1000, to_come=layers * grads + tables, untied_table=0, tied_table=0,
                         layer_grads=grads, grads_in_backward=False)
    in_backward = replace(ordinary, to_come=grads + tables, grads_in_backward=True)
    recompute, keep = MemoryPlan(("recompute",) * layers), MemoryPlan(("keep",) * layers)
    # every layer recomputed (and a small loss): the bottom layer's backward is the peak, beside every layer's
    # gradients or one's
    small = [replace(s, vocab=1) for s in (ordinary, in_backward)]
    # (with the step in the backward the top layer's moment is the peak: the inputs kept below it, one's gradients)
    top = (layers - 1) * ordinary.layer_input
    assert estimate_peak(small[0], recompute) - estimate_peak(small[1], recompute) == (layers - 1) * grads - top
    assert max(step_moments(small[0], recompute)) == step_moments(small[0], recompute)[1]  # layer 0's backward
    # everything kept: the loss is the peak, before any layer's gradient exists either way
    assert estimate_peak(ordinary, keep) == estimate_peak(in_backward, keep)
    assert max(step_moments(ordinary, keep)) == step_moments(ordinary, keep)[0]


def test_the_model_plans_with_its_optimizer_footprint(tmp_path):
    """The trainer hands the model its optimizer's footprint: the step in the backward counts one layer's gradients
    to come, the ordinary step every layer's (the planner's sizes, as the model makes them at its first step)."""
    sizes = {}
    for in_backward in (False, True):
        _, model = full_model()
        t = full_trainer(tmp_path / str(in_backward), random_examples(4), model, optimizer_in_backward=in_backward)
        sizes[in_backward] = step_sizes(model.model, 4, 256, torch.float32, CPU, model.lm_head,
                                        optimizer=t.model.model.optimizer_footprint)
    assert sizes[True].grads_in_backward and not sizes[False].grads_in_backward
    layers = sizes[False].layers
    assert sizes[False].to_come - sizes[True].to_come == (layers - 1) * sizes[False].layer_grads


def test_full_finetuning_that_does_not_fit_names_a_leaner_optimizer(tmp_path, monkeypatch):
    """load_in_4bit, the LoRA advice, cannot apply to full fine-tuning: its "does not fit" error names the
    optimizers with less state instead (the 1B row at 0.6x HF Trainer's memory, where fp32 moments alone are
    9.2 GiB). The CPU has no budget of its own: a device of 1 MiB is simulated."""
    import pytest

    from pronghorn.errors import PronghornError
    from pronghorn.models import decoder as decoder_module

    t = full_trainer(tmp_path, random_examples(4), optim="adamw_bf16_sr")
    monkeypatch.setattr(decoder_module, "device_budget", lambda device, mx: (2**20, "sim"))
    with pytest.raises(PronghornError) as err:
        t.train()
    message = str(err.value)
    assert "does not fit the memory budget" in message and "load_in_4bit" not in message
    assert "optim='adamw_bf16_sr_bf16_moments' (4 bytes of optimizer state per weight, not 8)" in message
    assert "'adamw_8bit'" in message and "optimizer_in_backward=True" in message


def test_the_advice_follows_the_optimizer():
    lean = optimizer_footprint("adamw_bf16_sr_bf16_moments", True, full_finetuning=True).advice
    assert lean == "optim='adamw_8bit' (2 bytes of optimizer state per weight; bitsandbytes, CUDA)"
    assert optimizer_footprint("adamw_8bit", True, full_finetuning=True).advice.startswith("LoRA instead")
    assert optimizer_footprint("adamw_bf16_sr", False).advice == ""  # LoRA: the planner's own advice
    assert optimizer_footprint("adamw_bf16_sr", True, True) == optimizer_footprint("adamw_bf16_sr", True)


def test_plans_count_the_optimizer_state_until_the_trainers_first_step(tmp_path, monkeypatch):
    """Every plan made before the trainer's first optimizer step counts the state still to come, whatever batch
    shape it is for (GRPO's micro-batches differ in width); plans made after it find the state resident."""
    from pronghorn.models import decoder as decoder_module

    t = full_trainer(tmp_path, random_examples(4))
    decoder, seen = t.model.model, []
    original = decoder_module.step_sizes
    monkeypatch.setattr(decoder_module, "step_sizes", lambda *a, **k: seen.append(k["first_step"]) or original(*a, **k))
    assert decoder.optimizer_state_allocated is False
    t.model.train()
    for seq in (16, 300):
        decoder.plan_step(2, seq, t.model.dtype, CPU, t.model.lm_head)
    t.train_step(random_examples(2))
    decoder.plan_step(2, 600, t.model.dtype, CPU, t.model.lm_head)
    assert seen[:2] == [True, True] and seen[-1] is False and decoder.optimizer_state_allocated is True
