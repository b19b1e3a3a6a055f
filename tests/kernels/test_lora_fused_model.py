"""The decoder takes the fused LoRA ops where they apply and trains like the reference path.

The LoRA ops' device dispatch is forced each way (CPU tensors would take the references), so a tiny Llama
(GQA, 2 layers, on the GPU where one exists) runs LoRAQKVFunction for q/k/v and LoRALinearFunction for o_proj
and each MLP projection (the fused MLP block lost to per-projection ops on the H100, docs/benchmarks.md, so the
model does not use it). Loss and every adapter gradient must match the reference path within 1e-5
of the tensor's largest element in fp32 (observed <= 3e-6: the fused ops sum the same products in another
order, and the two layers and the loss amplify that rounding noise); both are that close to the fp64 model.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from helpers import make_pair
from lora_cases import DEVICE, force_fused as _force_fused
from pronghorn.models.lora import LoRAConfig, attach_lora, lora_modules

lora_linear_module = importlib.import_module("pronghorn.kernels.lora_linear")


def _model(dropout=0.0):
    _, model = make_pair("llama3_gqa_rope_scaling")
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8, lora_dropout=dropout), seed=11)
    with torch.no_grad():  # B = 0 would zero every A gradient
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    return model.to(DEVICE).train()


def _step(model):
    ids = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    grads = {f"{n}.{part}": getattr(m, part).grad for n, m in lora_modules(model) for part in ("lora_A", "lora_B")}
    return loss.item(), grads


def test_fused_paths_train_like_the_reference(monkeypatch):
    model = _model()
    ref_calls = _force_fused(monkeypatch, fused=False)
    ref_loss, ref_grads = _step(copy.deepcopy(model))
    _, exact_grads = _step(copy.deepcopy(model).double())
    assert not any(ref_calls.values())
    calls = _force_fused(monkeypatch)
    loss, grads = _step(model)
    assert calls == {"LoRALinearFunction": 8, "LoRAMLPFunction": 0, "LoRAQKVFunction": 2}  # o + 3 MLP, qkv per layer
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss
    for name, ref in ref_grads.items():
        scale = ref.abs().max()
        assert (grads[name] - ref).abs().max() <= 1e-5 * scale, name
        assert (grads[name].double() - exact_grads[name]).abs().max() <= 1e-5 * scale, name


def test_dropout_keeps_the_projections_separate(monkeypatch):
    calls = _force_fused(monkeypatch)
    _step(_model(dropout=0.1))
    assert calls == {"LoRALinearFunction": 14, "LoRAMLPFunction": 0, "LoRAQKVFunction": 0}


@pytest.mark.parametrize("mode,tiled", [("on", False), ("offload", False), ("offload", True)],
                         ids=["recompute", "offload", "offload-tiled-mlp"])
def test_replayed_layers_skip_down_proj_and_stay_exact(monkeypatch, mode, tiled):
    """A layer replayed for its backward throws its output away, so its down_proj runs with output_unused (no
    matmul); the gradients stay bitwise those of the run without checkpointing."""
    model = _model()
    _force_fused(monkeypatch)
    tiling = dict(tiled_mlp="on" if tiled else "off", tiled_mlp_chunk=8)
    reference = copy.deepcopy(model)
    reference.gradient_checkpointing_enable(mode="off", **tiling)  # tiled: chunk sums round differently
    _, ref_grads = _step(reference)
    unused = []
    original = lora_linear_module.LoRALinearFunction.apply
    monkeypatch.setattr(lora_linear_module.LoRALinearFunction, "apply",
                        lambda *a: unused.append(len(a) > 8 and a[8]) or original(*a))
    model.gradient_checkpointing_enable(mode=mode, replay="split" if mode == "offload" else "whole", **tiling)
    _, grads = _step(model)
    # per replayed layer one down_proj; tiled: one per chunk (2 x 15 tokens in chunks of 8) + a 1-token probe
    # of the output's width, the layer replay's tiled block computing nothing else; offload replays the attention
    # block apart (checkpointing._split_replay), its o_proj's output unused too
    assert unused.count(True) == 2 * ((4 + 1 if tiled else 1) + (mode == "offload"))
    for name, ref in ref_grads.items():
        assert torch.equal(grads[name], ref), name
