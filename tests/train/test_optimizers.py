"""TrainConfig.optim: torch AdamW (fused / foreach), bitsandbytes 8-bit AdamW on a GPU, HF/TRL names, bad names."""

import sys
import types

import pytest
import torch

from pronghorn.errors import PronghornError
from pronghorn.train.config import TrainConfig
from pronghorn.train.optimizers import build_optimizer, optimizer_name

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.01)


def _params():
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


@pytest.mark.parametrize("name,canonical", [("adamw_torch_fused", "adamw_torch_fused"), ("ADAMW_TORCH", "adamw_torch"),
                                            ("adamw_bnb_8bit", "adamw_8bit"), ("adamw", "adamw_torch_fused"),
                                            ("paged_adamw_8bit", "paged_adamw_8bit")])
def test_hf_and_trl_names(name, canonical):
    assert optimizer_name(name) == canonical
    assert TrainConfig(optim=name).optim == canonical


@pytest.mark.parametrize("name", ["sgd", "adafactor", "lion_8bit", "adamw_torch_4bit"])
def test_unsupported_names_are_refused_with_the_choices(name):
    with pytest.raises(PronghornError, match=f"optim '{name}' is not supported.*adamw_torch_fused"):
        TrainConfig(optim=name)


def test_torch_adamw_variants_keep_the_settings():
    fused = build_optimizer(_params(), "adamw_torch_fused", device=CPU, **HYPER)
    plain = build_optimizer(_params(), "adamw_torch", device=CPU, **HYPER)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for opt in (fused, plain):
        assert isinstance(opt, torch.optim.AdamW)
        assert {k: opt.defaults[k] for k in HYPER} == HYPER


def test_fused_and_plain_adamw_take_the_same_steps():
    a, b = _params(), _params()
    for p, q in zip(a, b):
        q.data.copy_(p.data)
    opts = [build_optimizer(a, "adamw_torch_fused", device=CPU, **HYPER),
            build_optimizer(b, "adamw_torch", device=CPU, **HYPER)]
    for step in range(3):
        for p, q in zip(a, b):
            p.grad = torch.full_like(p, 0.1 * (step + 1))
            q.grad = p.grad.clone()
        for opt in opts:
            opt.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_8bit_on_cpu_names_the_alternative():
    with pytest.raises(PronghornError, match="CUDA GPU only.*optim='adamw_torch_fused'"):
        build_optimizer(_params(), "adamw_8bit", device=CPU, **HYPER)


def test_8bit_without_bitsandbytes_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(PronghornError, match="pip install bitsandbytes.*adamw_torch_fused"):
        build_optimizer(_params(), "adamw_8bit", device=CUDA, **HYPER)


@pytest.mark.parametrize("name,cls", [("adamw_8bit", "AdamW8bit"), ("paged_adamw_8bit", "PagedAdamW8bit"),
                                      ("paged_adamw_32bit", "PagedAdamW32bit")])
def test_8bit_builds_the_bitsandbytes_class_with_the_settings(monkeypatch, name, cls):
    made = {}

    def record(kind):
        class Recorder:
            def __init__(self, params, **kw):
                made.update(kind=kind, params=params, **kw)
        return Recorder

    fake = types.SimpleNamespace(optim=types.SimpleNamespace(**{c: record(c) for c in
                                                                ("AdamW8bit", "PagedAdamW8bit", "PagedAdamW32bit")}))
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    params = _params()
    opt = build_optimizer(params, name, device=CUDA, **HYPER)
    assert made.pop("kind") == cls and made.pop("params") == params and made == HYPER
    assert (type(opt) is getattr(fake.optim, cls)) == name.startswith("paged_")  # 8-bit: the subclass without syncs


def test_8bit_step_without_syncs_equals_bitsandbytes_step(monkeypatch):
    """bitsandbytes' own step waits for the device after every parameter; ours makes the same updates without
    (bitsandbytes 0.50 runs its 8-bit AdamW on the CPU too, so the updates are compared bit for bit here)."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.optim.optimizer as bnb_optimizer

    from pronghorn.train.optimizers import _without_per_parameter_syncs

    waits = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: waits.append(t))
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(64, 128, dtype=torch.bfloat16)), torch.nn.Parameter(torch.randn(16))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]  # 8-bit state, and 32-bit under 4096 elements
    opts = [_without_per_parameter_syncs(bnb.optim.AdamW8bit)(ours, **HYPER), bnb.optim.AdamW8bit(theirs, **HYPER)]
    for _ in range(4):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        before = len(waits)
        opts[0].step()
        assert len(waits) == before
        opts[1].step()
    assert len(waits) == 8  # theirs: one wait per parameter per step
    assert _without_per_parameter_syncs(bnb.optim.AdamW8bit) is type(opts[0])  # one subclass, however many built
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        for key, value in opts[1].state[q].items():
            assert torch.equal(torch.as_tensor(opts[0].state[p][key]), torch.as_tensor(value)), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_8bit_adamw_on_gpu_steps_like_adamw():
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128, device="cuda"))  # >= 4096 elements: 8-bit states
    q = torch.nn.Parameter(p.detach().clone())
    opts = [build_optimizer([p], "adamw_8bit", device=CUDA, **HYPER),
            build_optimizer([q], "adamw_torch_fused", device=CUDA, **HYPER)]
    for _ in range(5):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    # 5 steps of lr 1e-3 move each weight up to 5e-3; the 8-bit states' quantization error stays well below that
    assert (p.detach() - q.detach()).abs().max() < 5e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_8bit_adamw_on_gpu_does_not_wait_for_the_device(monkeypatch):
    pytest.importorskip("bitsandbytes")
    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: waits.append(a))
    p = torch.nn.Parameter(torch.randn(64, 128, device="cuda", dtype=torch.bfloat16))
    opt = build_optimizer([p], "adamw_8bit", device=CUDA, **HYPER)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    assert waits == []
