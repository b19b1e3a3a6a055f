"""The dtype a model computes in: bf16 only where the GPU has it natively (a T4's is emulated), fp16 otherwise,
and fp32 for Gemma 3, whose activations overflow fp16; a Gemma 3 forward in fp32 weights leaves fp16 autocast
(a Trainer with fp16=True) and gives fp32's result where fp16 gives inf."""

import pytest
import torch

import pronghorn
from helpers import make_pair, make_tiny_tokenizer
from pronghorn.models import precision
from pronghorn.models.loader import load_pretrained


@pytest.mark.parametrize("capability,native", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_bfloat16_is_supported_only_where_the_gpu_computes_it(monkeypatch, capability, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert pronghorn.is_bfloat16_supported() is native
    assert precision.is_bfloat16_supported("cuda:0") is native


def test_no_bfloat16_without_a_gpu():
    assert precision.is_bfloat16_supported("cpu") is False
    if not torch.cuda.is_available():
        assert pronghorn.is_bfloat16_supported() is False


@pytest.mark.parametrize("native,model_type,expected", [
    (True, "llama", torch.bfloat16), (True, "gemma3_text", torch.bfloat16),
    (False, "llama", torch.float16), (False, "gemma2", torch.float16), (False, "gemma3_text", torch.float32),
])
def test_default_dtype_on_a_gpu(monkeypatch, capsys, native, model_type, expected):
    monkeypatch.setattr(precision, "is_bfloat16_supported", lambda device=None: native)
    assert precision.default_dtype("cuda", model_type) == expected
    said = capsys.readouterr().out
    assert ("exceed float16's range (65,504)" in said) == (expected == torch.float32)
    assert precision.default_dtype("cpu", model_type) == torch.float32


def _gemma3_dir(tmp_path):
    hf, _ = make_pair("gemma3_text")
    hf.save_pretrained(str(tmp_path))
    make_tiny_tokenizer().save_pretrained(str(tmp_path))
    return tmp_path


def test_loading_gemma3_in_float16_warns(tmp_path):
    path = _gemma3_dir(tmp_path)
    with pytest.warns(UserWarning, match="gemma3_text in float16: its activations exceed float16's range"):
        model = load_pretrained(str(path), dtype=torch.float16, device="cpu").model
    assert model.dtype == torch.float16
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_pretrained(str(path), dtype=torch.bfloat16, device="cpu").model.dtype == torch.bfloat16


def _overflowing_gemma3():
    """A tiny Gemma 3 whose MLP output norm scales the residual past fp16's range, as the real checkpoints' large
    RMSNorm weights do; the next layer's norm brings it back, so fp32 is finite."""
    _, model = make_pair("gemma3_text")
    with torch.no_grad():
        model.model.layers[0].post_feedforward_layernorm.weight.fill_(3e5)
    return model


def _logits_and_loss(model, autocast: bool):
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        out = model(input_ids=ids, labels=ids)
    return out.logits, out.loss


def test_gemma3_leaves_fp16_autocast_and_gives_fp32s_result(capsys):
    model = _overflowing_gemma3()
    logits, loss = _logits_and_loss(model, autocast=False)
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    guarded_logits, guarded_loss = _logits_and_loss(model, autocast=True)
    assert guarded_logits.dtype == torch.float32
    assert torch.equal(guarded_logits, logits) and torch.equal(guarded_loss, loss)
    assert "overflows float16: its forward runs in float32" in capsys.readouterr().out
    half_logits, _ = _logits_and_loss(model.half(), autocast=False)  # what fp16 weights give
    assert not torch.isfinite(half_logits).all()


def test_without_the_guard_fp16_autocast_overflows(monkeypatch):
    """What the guard prevents: the same forward under fp16 autocast, the family not marked."""
    model = _overflowing_gemma3()
    monkeypatch.setattr(precision, "overflows_fp16", lambda model_type: False)
    logits, _ = _logits_and_loss(model, autocast=True)
    assert not torch.isfinite(logits).all()


def test_other_families_keep_fp16_autocast():
    _, model = make_pair("llama3_gqa_rope_scaling")
    plain, _ = _logits_and_loss(model, autocast=False)
    autocast, _ = _logits_and_loss(model, autocast=True)
    assert autocast.dtype == torch.float16 and not torch.equal(autocast.float(), plain)
