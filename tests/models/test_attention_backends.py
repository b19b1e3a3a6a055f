"""The kernel policy's SDPA backend (``KernelPolicy.attention``, models/attention.py ``sdpa_backends``): whichever
backend goes first, a model's loss and LoRA gradients match the math backend's (fp32: tight; bf16 on a GPU: each
within twice the math backend's own error against an fp64 run, plus 2^-9), and on a GPU the chosen backend's
kernels are the ones that run."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import randomize_lora_b, tiny_lora_model
from lora_cases import BF16_SLACK, DEVICE, rel
from pronghorn.errors import PronghornError
from pronghorn.kernels.policy import ATTENTION, KernelPolicy

CUDA = torch.cuda.is_available()


def _model(dtype):
    model = tiny_lora_model()
    randomize_lora_b(model, seed=11, scale=0.1)
    return model.to(DEVICE, dtype).train()


def _loss_and_grads(model, choice: str):
    from pronghorn.models.lora import lora_modules

    model.set_kernel_policy(KernelPolicy(attention=choice))
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    out = [loss.detach()] + [t.grad for _, m in lora_modules(model) for t in (m.lora_A, m.lora_B)]
    model.zero_grad(set_to_none=True)
    return out


def test_an_unknown_backend_is_a_clear_error():
    with pytest.raises(PronghornError, match="attention must be one of"):
        KernelPolicy(attention="flash3")


@pytest.mark.parametrize("choice", ATTENTION)
def test_every_backend_choice_matches_the_math_backend_in_fp32(choice):
    model = _model(torch.float32)
    ref = _loss_and_grads(model, "math")
    got = _loss_and_grads(model, choice)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert rel(g, r) <= 2e-5, f"item {i}: {rel(g, r):.3g}"


@pytest.mark.skipif(not CUDA, reason="the fused SDPA backends run on CUDA in bf16")
@pytest.mark.parametrize("choice", ATTENTION)
def test_every_backend_choice_is_as_exact_as_the_math_backend_in_bf16(choice):
    model = _model(torch.float32)
    exact = _loss_and_grads(copy.deepcopy(model).double(), "math")
    bf16 = model.to(torch.bfloat16)
    ref, got = _loss_and_grads(bf16, "math"), _loss_and_grads(bf16, choice)
    for i, (g, r, e) in enumerate(zip(got, ref, exact)):
        assert rel(g, e) <= 2 * rel(r, e) + BF16_SLACK, f"item {i}: {rel(g, e):.3g} vs math {rel(r, e):.3g}"


@pytest.mark.skipif(not CUDA, reason="kernel names of the CUDA backends")
@pytest.mark.parametrize("choice, marker", [("flash", "flash"), ("cudnn", "cudnn")])
def test_the_chosen_backend_runs(choice, marker):
    from torch.profiler import ProfilerActivity, profile

    model = _model(torch.bfloat16)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _loss_and_grads(model, choice)
        torch.cuda.synchronize()
    names = {e.name.lower() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    assert any(marker in n for n in names), sorted(n[:60] for n in names)
