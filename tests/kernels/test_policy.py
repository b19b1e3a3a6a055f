"""The kernel policy (pronghorn/kernels/policy.py): one fast path with or without autocast.

With ``adapter_math="base"`` a bf16 base with fp32 adapters computes, without autocast, bitwise what it computes
under ``torch.autocast(bfloat16)``: the fused op, its reference, and a whole model's loss and LoRA gradients.
``"adapter"`` keeps PEFT's no-autocast numerics (the delta in fp32). The fused Functions are taken both ways.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from lora_cases import DEVICE, as_dtype, projection, randn, run
from pronghorn.errors import PronghornError
from pronghorn.kernels.lora_linear import LoRALinearFunction, lora_linear_reference
from pronghorn.kernels.lora_qkv import lora_qkv_reference
from pronghorn.kernels.policy import KernelPolicy

lora_linear_module = importlib.import_module("pronghorn.kernels.lora_linear")
lora_qkv_module = importlib.import_module("pronghorn.kernels.lora_qkv")
BASE, ADAPTER = KernelPolicy("base"), KernelPolicy("adapter")


def _bf16_case(gen):
    x = randn(2, 9, 24, generator=gen).to(torch.bfloat16)
    p = as_dtype([projection(24, 40, 4, gen)], torch.bfloat16, torch.float32)[0]
    return x, p


def _autocast():
    return torch.autocast(DEVICE, dtype=torch.bfloat16)


def test_compute_dtype():
    x16, w16 = torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(3, 3, dtype=torch.bfloat16)
    assert BASE.compute_dtype(x16, w16) == torch.bfloat16
    assert ADAPTER.compute_dtype(x16, w16) is None
    assert BASE.compute_dtype(x16.half(), w16.half()) is None  # fp16 without a GradScaler: adapters stay fp32
    assert BASE.compute_dtype(x16.float(), w16.float()) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ADAPTER.compute_dtype(x16.float(), w16.float()) == torch.bfloat16
    with pytest.raises(PronghornError, match="adapter_math"):
        KernelPolicy("fp8")


def test_fused_op_without_autocast_is_the_autocast_op(monkeypatch):
    """LoRALinearFunction without autocast under the "base" policy: bitwise its values under autocast."""
    monkeypatch.setattr(lora_linear_module, "use_triton", lambda *t: True)
    gen = torch.Generator().manual_seed(0)
    x, p = _bf16_case(gen)
    fn = lambda x_, *ps: lora_linear_module.lora_linear(x_, *ps[0], policy=BASE)  # noqa: E731
    plain = run(fn, x, [p])
    with _autocast():
        autocast = run(fn, x, [p])
    for a, b in zip(plain, autocast):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert "LoRALinearFunction" in type(fn(x.requires_grad_(), p).grad_fn).__name__


def test_reference_without_autocast_is_the_autocast_reference():
    gen = torch.Generator().manual_seed(1)
    x, p = _bf16_case(gen)
    ref = lambda x_, *ps: lora_linear_reference(x_, *ps[0], cdt=torch.bfloat16)  # noqa: E731
    plain = run(ref, x, [p])
    with _autocast():
        autocast = run(lambda x_, *ps: lora_linear_reference(x_, *ps[0]), x, [p])
    for a, b in zip(plain, autocast):
        assert torch.equal(a, b)
    qkv = [projection(24, n, 4, gen) for n in (16, 8, 8)]
    qkv = as_dtype(qkv, torch.bfloat16, torch.float32)
    plain = run(lambda x_, *ps: lora_qkv_reference(x_, *ps, cdt=torch.bfloat16), x, qkv)
    with _autocast():
        autocast = run(lambda x_, *ps: lora_qkv_reference(x_, *ps), x, qkv)
    for a, b in zip(plain, autocast):
        assert torch.equal(a, b)


def test_adapter_policy_keeps_peft_numerics(monkeypatch):
    """"adapter": the delta in fp32 (PEFT without autocast), fused and reference alike."""
    gen = torch.Generator().manual_seed(2)
    x, p = _bf16_case(gen)
    peft = run(lambda x_, *ps: lora_linear_reference(x_, *ps[0]), x, [p])
    monkeypatch.setattr(lora_linear_module, "use_triton", lambda *t: False)
    ref = run(lambda x_, *ps: lora_linear_module.lora_linear(x_, *ps[0], policy=ADAPTER), x, [p])
    for a, b in zip(peft, ref):
        assert torch.equal(a, b)
    monkeypatch.setattr(lora_linear_module, "use_triton", lambda *t: True)
    seen = []
    original = LoRALinearFunction.apply
    monkeypatch.setattr(LoRALinearFunction, "apply", lambda *a: seen.append(a[7]) or original(*a))
    lora_linear_module.lora_linear(x, *p, policy=ADAPTER)
    lora_linear_module.lora_linear(x, *p, policy=BASE)
    assert seen == [None, torch.bfloat16]  # the compute dtype handed to the Function


def _model(policy):
    from helpers import make_pair, randomize_lora_b
    from pronghorn.models.lora import LoRAConfig, attach_lora

    _, model = make_pair("llama3_gqa_rope_scaling")
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8), seed=11)
    randomize_lora_b(model, seed=11, scale=0.1)
    model.to(torch.bfloat16)
    for n, p in model.named_parameters():  # adapters fp32 on the bf16 base, as get_peft_model makes them
        if "lora_" in n:
            p.data = p.data.float()
    model.set_kernel_policy(policy)
    return model.to(DEVICE).train()


def _step(model):
    from pronghorn.models.lora import lora_modules

    ids = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: (m.lora_A.grad, m.lora_B.grad) for n, m in lora_modules(model)}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_model_without_autocast_equals_model_with_it(monkeypatch, fused):
    """A bf16 model with fp32 adapters: loss and every LoRA gradient bitwise the autocast run's, and the fused
    Functions taken in both (forced on the CPU: the interpreter runs the Triton parts)."""
    calls = []
    for name in ("lora_linear", "lora_qkv"):
        mod = importlib.import_module(f"pronghorn.kernels.{name}")
        monkeypatch.setattr(mod, "use_triton", lambda *t: fused)
    for fn in (LoRALinearFunction, lora_qkv_module.LoRAQKVFunction):
        original = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *a, _o=original, _n=fn.__name__: calls.append(_n) or _o(*a))
    model = _model(BASE)
    with _autocast():
        ref_loss, ref_grads = _step(copy.deepcopy(model))
    autocast_calls, calls[:] = list(calls), []
    loss, grads = _step(model)
    assert calls == autocast_calls and (len(calls) > 0) == fused
    assert torch.equal(loss, ref_loss.to(loss.dtype))
    for name, (da, db) in grads.items():
        assert da.dtype == torch.float32
        assert torch.equal(da, ref_grads[name][0]) and torch.equal(db, ref_grads[name][1]), name
