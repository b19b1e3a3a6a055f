"""Merging into an NF4 (QLoRA) base: dequantized weights by default, the original 16-bit checkpoint on request."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pronghorn.export.merged import merged_state_dict, save_merged
from pronghorn.export.save import save_pretrained_merged
from pronghorn.models.linear import Linear
from pronghorn.models.lora import LoRAConfig, attach_lora
from pronghorn.models.quantized_checkpoint import quantize_model_nf4
from helpers import make_pair


def _adapter(model):
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8), seed=3)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, Linear) and m.has_lora:
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.05)
    return model


def _expected(model, name, base):
    m = model.get_submodule(name)
    return base.float() + (m.lora_B.float() @ m.lora_A.float()) * m.lora_scaling


@pytest.fixture
def qlora(tmp_path):
    _, dense = make_pair("llama2")
    save_merged(dense, tmp_path / "base16")  # the "original" 16-bit checkpoint
    original = {n: p.detach().clone() for n, p in dense.state_dict().items()}
    quantize_model_nf4(dense)
    return _adapter(dense), original, tmp_path / "base16"


def test_merges_into_dequantized_nf4_and_warns(qlora, tmp_path):
    model, original, _ = qlora
    name = "model.layers.1.mlp.down_proj"
    sd = merged_state_dict(model, torch.float32)
    expect = _expected(model, name, model.get_submodule(name).dense_weight())
    torch.testing.assert_close(sd[f"{name}.weight"], expect, rtol=0, atol=1e-6)
    assert not torch.allclose(sd[f"{name}.weight"], _expected(model, name, original[f"{name}.weight"]), atol=1e-4)
    assert not any(k.endswith(("absmax", "quant_map", "lora_A", "lora_B")) or "quant_state" in k for k in sd)
    with pytest.warns(UserWarning, match="dequantized 4-bit"):
        save_merged(model, tmp_path / "out", dtype=torch.float32)


def test_merges_into_the_original_checkpoint_when_given(qlora, tmp_path):
    model, original, base16 = qlora
    save_merged(model, tmp_path / "out", dtype=torch.float32, base_checkpoint=base16)
    sd = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        torch.testing.assert_close(sd[f"{name}.weight"], _expected(model, name, original[f"{name}.weight"]),
                                   rtol=0, atol=1e-6)


def test_base_checkpoint_of_another_model_is_refused(qlora, tmp_path):
    from pronghorn.errors import CheckpointError

    model, _, _ = qlora
    _, other = make_pair("qwen2_bias")
    save_merged(other, tmp_path / "other")
    with pytest.raises(CheckpointError, match="shape|missing"):
        save_merged(model, tmp_path / "out", base_checkpoint=tmp_path / "other")
    assert not (tmp_path / "out").exists()


def test_merged_4bit_forced_writes_a_bnb_checkpoint(qlora, tmp_path):
    from pronghorn.models.quantized_checkpoint import read_bnb_weights

    model, _, _ = qlora

    class Tok:  # the smallest tokenizer stand-in: save_pretrained only
        eos_token_id = 2

        def save_pretrained(self, path):
            (tmp_path / "tok_saved").write_text(path)

    save_pretrained_merged(model, tmp_path / "q4", Tok(), save_method="merged_4bit_forced")
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    weights = read_bnb_weights(load_file(str(tmp_path / "q4" / "model.safetensors")))
    name = "model.layers.1.mlp.down_proj"
    got = weights[f"{name}.weight"].dequantize(torch.float32)
    want = _expected(model, name, model.get_submodule(name).dense_weight())
    assert (got - want).abs().max() <= want.abs().max() * 0.2  # one NF4 step of the merged weight
