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


def test_a_graph_store_keeps_its_tensors_and_makes_them_again_in_place_once_per_renew():
    """The decoder's store (a CUDA graph reads the operands' memory): the same tensors within a generate call,
    under inference mode too; after ``renew`` the same tensors hold the adapters' new values, also after a write
    that bumps no version (``.data``, as an 8-bit optimizer's kernel writes); a cast to the adapter's own dtype
    is the adapter itself and is not copied into."""
    from pronghorn.kernels.adapter_operands import GraphOperands

    a, b = _adapter()
    projs = [LoRAProjection(None, None, *_adapter(seed=i), scaling=2.0) for i in range(2)]
    store = GraphOperands()
    with operands_kept(store), torch.inference_mode():
        first = adapter_operands(a, b, 2.0, torch.bfloat16)
        stacked = stacked_operands(projs, torch.bfloat16)
        own = adapter_operands(a, b, 1.0, torch.float32)
        assert own[0] is a and own[1] is b  # no copies: fp32 adapters, scaling 1
        assert adapter_operands(a, b, 2.0, torch.bfloat16) is first
        a.data.mul_(-1.0)  # no version bump
        projs[1].lora_B.data.add_(1.0)
        assert adapter_operands(a, b, 2.0, torch.bfloat16) is first  # within the call: unchanged
        store.renew()
        again = adapter_operands(a, b, 2.0, torch.bfloat16)
        assert again is first and again[0] is first[0] and torch.equal(again[0], a.to(torch.bfloat16))
        restacked = stacked_operands(projs, torch.bfloat16)
        assert restacked is stacked and all(x is y for x, y in zip(restacked[1], stacked[1]))
        assert torch.equal(restacked[1][1], scaled_b(projs[1].lora_B, 2.0, torch.bfloat16))
        assert adapter_operands(a, b, 1.0, torch.float32)[0] is a
