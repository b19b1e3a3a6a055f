"""Exact-size pinned host buffers (models/pinned_host.py): offloading through the pool is exact, the buffers
are reused from step to step, and releasing them unregisters everything."""

import pytest
import torch

from pronghorn.models import pinned_host

from .test_recompute import _batch, _loss_and_grads, tiny_lora_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cudaHostRegister)")


def test_small_blocks_stay_with_the_caching_allocator():
    t, lease = pinned_host.pinned_empty((4, 8), torch.bfloat16)
    assert lease is None and t.is_pinned() and t.shape == (4, 8)


def test_offload_through_the_exact_pool_is_exact_and_reuses_buffers(monkeypatch):
    monkeypatch.setattr(pinned_host, "EXACT_ABOVE", 0)  # every layer input through the pool
    pinned_host.release_pooled()
    model = tiny_lora_model().cuda().train()
    batch = {k: v.cuda() for k, v in _batch().items()}
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(mode="offload")
    for _ in range(2):  # the second step takes the first step's buffers back from the pool
        loss, grads = _loss_and_grads(model, batch)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
        for n, g in ref_grads.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-6, atol=1e-7, msg=n)
        pooled = pinned_host.pooled_bytes()
        assert pooled > 0
    t, lease = pinned_host.pinned_empty((3, 5), torch.float32)
    assert t.is_pinned() and lease is not None and t.numel() * 4 == lease.buffer.numel()
    lease.release()
    assert pinned_host.pooled_bytes() == pooled + 60
    pinned_host.release_pooled()
    assert pinned_host.pooled_bytes() == 0
