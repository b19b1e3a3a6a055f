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


def test_a_budget_that_fits_the_step_in_the_backward_keeps_what_the_ordinary_step_must_recompute(tmp_path):
    """A budget halfway between the two steps' keep-everything estimates: the ordinary full fine-tuning step
    recomputes a layer to fit it, the step in the backward (fewer gradients) keeps every layer."""
    from pronghorn.models.memory_plan import HEADROOM, MemoryPlan, estimate_peak

    _, model = full_model()
    keep = [estimate_peak(step_sizes(model.model, 4, 256, torch.float32, CPU, model.lm_head,
                                     optimizer=optimizer_footprint("adamw_torch_fused", f)), MemoryPlan(("keep",) * 2))
            for f in (False, True)]
    assert keep[1] < keep[0]
    budget = int((keep[0] + keep[1]) / 2 / (1 - HEADROOM))
    plans = []
    for in_backward in (False, True):
        _, model = full_model()
        model.gradient_checkpointing_enable(mode="auto", max_memory=budget)
        t = full_trainer(tmp_path / str(in_backward), random_examples(4), model, optimizer_in_backward=in_backward)
        t.model.train()
        t.train_step(t.step_examples(0))
        plans.append(model.memory_plan.layers)
    assert plans == [("recompute", "keep"), ("keep", "keep")]


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
