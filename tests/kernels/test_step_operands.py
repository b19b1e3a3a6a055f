"""The adapters' operands kept across training steps (kernels/step_operands.py): made once, written again in place
after an optimizer step or an in-place write, bit for bit what a fresh cast gives, and a model trained with them
steps exactly as one that makes them in every op."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import make_pair
from lora_cases import DEVICE, force_fused
from pronghorn.kernels import adapter_operands as operands_module
from pronghorn.kernels.adapter_operands import adapter_operands, operands_kept, scaled_b, stacked_operands
from pronghorn.kernels.lora_math import LoRAProjection
from pronghorn.kernels.step_operands import StepOperands, training_operands
from pronghorn.models.lora import LoRAConfig, attach_lora, lora_modules

BF16 = torch.bfloat16


def _adapter(seed=0, r=4, n_in=8, n_out=6):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)
    return torch.nn.Parameter(a), torch.nn.Parameter(b)


def _fresh_one(a, b, scaling):
    return a.to(BF16), scaled_b(b, scaling, BF16)


def test_entries_stay_until_an_optimizer_step_then_are_written_again_in_place():
    a, b = _adapter()
    store = StepOperands()
    with training_operands(store):
        first = adapter_operands(a, b, 1.5, BF16)
        assert adapter_operands(a, b, 1.5, BF16) is first
    with training_operands(store):  # a second forward, nothing changed: the same tensors, no remake
        assert adapter_operands(a, b, 1.5, BF16) is first
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    torch.optim.SGD([a, b], lr=0.37).step()
    kept = [t.clone() for t in first]
    with training_operands(store):
        again = adapter_operands(a, b, 1.5, BF16)
    assert again is first and all(not torch.equal(t, k) for t, k in zip(again, kept))
    for made, fresh in zip(again, _fresh_one(a, b, 1.5)):
        assert made.dtype == fresh.dtype and torch.equal(made, fresh)


def test_an_in_place_write_to_an_adapter_remakes_its_entry():
    a, b = _adapter()
    store = StepOperands()
    with training_operands(store):
        first = adapter_operands(a, b, 2.0, BF16)
    with torch.no_grad():
        b.mul_(-3.1)
    with training_operands(store):
        assert adapter_operands(a, b, 2.0, BF16) is first
    assert torch.equal(first[1], scaled_b(b, 2.0, BF16))


def test_a_stack_is_remade_block_by_block():
    projs = [LoRAProjection(None, None, *_adapter(seed=i, r=2 + i, n_out=5 + i), scaling=0.5 + i) for i in range(3)]
    store = StepOperands()
    with training_operands(store):
        a, bss = stacked_operands(projs, BF16)
    with torch.no_grad():
        for i, p in enumerate(projs):
            p.lora_A.add_(0.25 * (i + 1))
            p.lora_B.sub_(0.5)
    with training_operands(store):
        kept = stacked_operands(projs, BF16)
    assert kept[0] is a and torch.equal(a, torch.cat([p.lora_A for p in projs]).to(BF16))
    for p, bs in zip(projs, kept[1]):
        assert torch.equal(bs, scaled_b(p.lora_B, p.scaling, BF16))


def test_an_adapter_in_the_compute_dtype_is_taken_as_it_is():
    a, b = _adapter()
    store = StepOperands()
    with training_operands(store):
        made = adapter_operands(a, b, 1.0, torch.float32)
    assert made[0] is a and made[1] is b and store.nbytes() == 0


def test_entries_no_forward_takes_are_dropped_and_inference_bypasses_the_store():
    a, b = _adapter()
    a2, b2 = _adapter(seed=1)
    store = StepOperands()
    with training_operands(store):
        adapter_operands(a, b, 2.0, BF16)
        adapter_operands(a2, b2, 2.0, BF16)
    assert len(store) == 2 and store.nbytes() == 2 * (a.numel() + b.numel()) * 2
    with training_operands(store):
        adapter_operands(a, b, 2.0, BF16)
    with training_operands(store):  # (a2, b2) were not used by the last forward: gone
        assert len(store) == 1
        with torch.inference_mode():
            assert len(store) == 1 and adapter_operands(a2, b2, 2.0, BF16) is not None and len(store) == 1
    with operands_kept(store), torch.no_grad():  # outside training_operands the store is still read as a store
        assert adapter_operands(a, b, 2.0, BF16) is store[next(iter(store))].value


def _bf16_model():
    _, model = make_pair("llama3_gqa_rope_scaling")
    model.to(BF16)  # a bf16 base with fp32 adapters: every op casts A and B to bf16 (the policy's compute dtype)
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8), seed=11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    return model.to(DEVICE).train()


def _train(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = []
    for step in range(steps):
        ids = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(step)).to(DEVICE)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out.append((loss.detach().clone(), {n: m.lora_A.grad.clone() for n, m in lora_modules(model)}))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("mode", ["off", "on", "offload"])
def test_training_with_kept_operands_equals_making_them_every_op(monkeypatch, mode):
    """Three AdamW steps of a bf16 model with fp32 adapters through the fused LoRA ops, nothing recomputed,
    every layer replayed, or offloaded with split replays and a tiled MLP: losses and gradients bitwise those of
    the same model without the store, and after the first step no op casts or scales an adapter."""
    force_fused(monkeypatch)
    made = [0]
    original = operands_module.scaled_b
    monkeypatch.setattr(operands_module, "scaled_b", lambda *a: made.__setitem__(0, made[0] + 1) or original(*a))
    model = _bf16_model()
    model.model.replay_graphs = "off"  # (on a GPU a graphed replay makes its own operands inside its graph)
    tiling = dict(tiled_mlp="on", tiled_mlp_chunk=8) if mode == "offload" else {}
    model.gradient_checkpointing_enable(mode=mode, replay="split" if mode == "offload" else "whole", **tiling)
    plain = copy.deepcopy(model)
    plain.model.step_operands = None
    expected = _train(plain)
    made[0] = 0
    counts = []
    original_begin = StepOperands.begin

    def begin(store):
        counts.append(made[0])
        original_begin(store)

    monkeypatch.setattr(StepOperands, "begin", begin)
    got = _train(model)
    assert counts[0] == 0 and counts[1] == counts[2] > 0  # made in the first forward only
    assert made[0] == counts[1]
    for (loss, grads), (ref_loss, ref_grads) in zip(got, expected):
        assert torch.equal(loss, ref_loss)
        for name, ref in ref_grads.items():
            assert torch.equal(grads[name], ref), name
    assert model.model.step_operands.nbytes() > 0


class _UncountedWrites(torch.optim.Optimizer):
    """Writes its parameters through ``.data``, which bumps no version (as bitsandbytes' 8-bit optimizers write
    them from C): only the step post-hook tells the store."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(0.5)


def test_an_optimizer_that_bumps_no_version_still_remakes_the_operands():
    a, b = _adapter()
    store = StepOperands()
    with training_operands(store):
        first = adapter_operands(a, b, 2.0, BF16)
    versions = (a._version, b._version)
    _UncountedWrites([a, b]).step()
    assert (a._version, b._version) == versions
    with training_operands(store):
        assert adapter_operands(a, b, 2.0, BF16) is first
    for made, fresh in zip(first, _fresh_one(a, b, 2.0)):
        assert torch.equal(made, fresh)


def test_an_adapter_whose_data_moves_gets_new_operands():
    """``Module.to`` and loads assign ``.data``: no version moves, the data does; the entry is made again."""
    a, b = _adapter()
    store = StepOperands()
    with training_operands(store):
        first = adapter_operands(a, b, 2.0, BF16)
    b.data = b.data.double().float() * 3  # new memory, the same version
    with training_operands(store):
        again = adapter_operands(a, b, 2.0, BF16)
    assert again is not first and torch.equal(again[1], scaled_b(b, 2.0, BF16))
