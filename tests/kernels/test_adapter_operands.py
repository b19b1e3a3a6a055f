"""The adapters' operands kept from a replayed layer's forward for its replays (kernels/adapter_operands.py): a
cache whose entries are taken only for the same tensors at the same versions."""

import torch

from pronghorn.kernels.adapter_operands import adapter_operands, operands_kept, scaled_b, stacked_operands
from pronghorn.kernels.lora_math import LoRAProjection


def _adapter(seed=0, r=4, n_in=8, n_out=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)


def test_outside_a_store_every_call_makes_new_operands():
    a, b = _adapter()
    first, second = adapter_operands(a, b, 2.0, torch.bfloat16), adapter_operands(a, b, 2.0, torch.bfloat16)
    assert first[0] is not second[0] and first[1] is not second[1]
    assert torch.equal(first[0], a.to(torch.bfloat16))
    assert torch.equal(first[1], b.to(torch.bfloat16) * 2.0)  # cast, then scaled in the compute dtype


def test_a_store_gives_the_same_operands_until_an_adapter_changes():
    a, b = _adapter()
    store = {}
    with operands_kept(store):
        first = adapter_operands(a, b, 2.0, torch.bfloat16)
        assert adapter_operands(a, b, 2.0, torch.bfloat16) is first
        other = adapter_operands(a, b, 0.5, torch.bfloat16)  # another scaling, dtype: other operands
        assert other is not first and torch.equal(other[1], scaled_b(b, 0.5, torch.bfloat16))
        assert adapter_operands(a, b, 2.0, torch.float16) is not first
        with torch.no_grad():
            b.add_(1.0)  # an in-place change (an optimizer step) bumps the version: new operands
        fresh = adapter_operands(a, b, 2.0, torch.bfloat16)
        assert fresh is not first and torch.equal(fresh[1], b.to(torch.bfloat16) * 2.0)
    assert adapter_operands(a, b, 2.0, torch.bfloat16) is not fresh  # the block is closed
    with operands_kept(store):  # reopened (a replay in the backward): the forward's operands again
        assert adapter_operands(a, b, 2.0, torch.bfloat16) is fresh


def test_a_store_is_keyed_by_the_tensors_themselves():
    a, b = _adapter()
    a2, b2 = a.clone(), b.clone()
    with operands_kept({}):
        first = adapter_operands(a, b, 2.0, torch.bfloat16)
        assert adapter_operands(a2, b2, 2.0, torch.bfloat16) is not first


def test_stacked_operands_for_projections_sharing_an_input():
    projs = [LoRAProjection(None, None, *_adapter(seed=i, n_out=6 + i), scaling=1.0 + i) for i in range(3)]
    a, bss = stacked_operands(projs, torch.bfloat16)
    assert torch.equal(a, torch.cat([p.lora_A for p in projs]).to(torch.bfloat16))
    for p, bs in zip(projs, bss):
        assert torch.equal(bs, scaled_b(p.lora_B, p.scaling, torch.bfloat16))
    with operands_kept({}):
        kept = stacked_operands(projs, torch.bfloat16)
        assert stacked_operands(projs, torch.bfloat16) is kept
        assert stacked_operands(projs[:2], torch.bfloat16) is not kept


def test_inference_mode_makes_new_operands():
    a, b = _adapter()
    with operands_kept({}), torch.inference_mode():
        assert adapter_operands(a, b, 2.0, torch.bfloat16) is not adapter_operands(a, b, 2.0, torch.bfloat16)
