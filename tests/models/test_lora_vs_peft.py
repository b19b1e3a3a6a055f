"""LoRA against PEFT on transformers: same gradients, and adapters that load both ways."""

import json

import peft
import pytest
import torch

from helpers import make_pair
from pronghorn.errors import CheckpointError, OutputExistsError
from pronghorn.export.adapter import save_adapter
from pronghorn.models.adapter_format import load_adapter
from pronghorn.models.lora import LoRAConfig, attach_lora, lora_modules, merge_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_pair(name, rslora=False, targets=TARGETS):
    hf, ours = make_pair(name)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, use_rslora=rslora)
    hf = peft.get_peft_model(hf, cfg)
    attach_lora(ours, LoRAConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora))
    torch.manual_seed(5)
    with torch.no_grad():  # B = 0 would make A's gradient vanish; give both models the same random B and A
        for pname, module in lora_modules(ours):
            peft_mod = hf.get_submodule("base_model.model." + pname)
            module.lora_B.normal_(0, 0.1)
            peft_mod.lora_A["default"].weight.copy_(module.lora_A)
            peft_mod.lora_B["default"].weight.copy_(module.lora_B)
    return hf, ours


@pytest.mark.parametrize("name,rslora", [("llama3_gqa_rope_scaling", False), ("qwen2_bias", True),
                                          ("qwen3_qknorm", False), ("mistral_sliding", False),
                                          ("mistral_nemo_headdim", False), ("gemma", False),
                                          ("gemma_mha_untied", True), ("gemma2", False),
                                          ("gemma2_no_softcap", False), ("gemma3_text", False),
                                          ("gemma3_text_softcap", False)])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_lora_gradients_match_peft(name, rslora, padding):
    hf, ours = _peft_pair(name, rslora)
    ids = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    if padding == "left":
        mask = mask.flip(-1)
    labels = ids.masked_fill(mask == 0, -100)
    if padding == "left":
        labels[1, 4] = -100  # its prediction comes from a padding position, whose output is unspecified
    hf.train(), ours.train()
    hf(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    n = 0
    for pname, module in lora_modules(ours):
        peft_mod = hf.get_submodule("base_model.model." + pname)
        for part in ("lora_A", "lora_B"):
            ref = getattr(peft_mod, part)["default"].weight.grad
            got = getattr(module, part).grad
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-7 * ref.abs().max()), (pname, part)
            n += 1
    assert n == 2 * 7 * ours.config.num_hidden_layers
    assert all(p.grad is None for n_, p in ours.named_parameters() if "lora" not in n_)


def test_only_adapters_are_trainable():
    _, ours = make_pair("llama2")
    attach_lora(ours, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(n.split(".")[-2] in ("q_proj", "v_proj") for n in trainable)


@pytest.mark.parametrize("name", ["llama3_gqa_rope_scaling", "mistral_nemo_headdim", "gemma", "gemma2",
                                  "gemma3_text"])
def test_saved_adapter_loads_in_peft_with_same_logits(name, tmp_path):
    hf, ours = _peft_pair(name)
    base_hf, _ = make_pair(name)
    save_adapter(ours, tmp_path / "a", base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny-llama" and cfg["peft_type"] == "LORA"
    loaded = peft.PeftModel.from_pretrained(base_hf, tmp_path / "a").eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref, got = loaded(input_ids=ids).logits, ours.eval()(input_ids=ids).logits
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max())


def test_peft_saved_adapter_loads_in_pronghorn(tmp_path):
    hf, _ = _peft_pair("qwen2_bias", rslora=True, targets=["q_proj", "down_proj"])
    hf.save_pretrained(tmp_path / "p")
    _, ours = make_pair("qwen2_bias")
    load_adapter(ours, tmp_path / "p")
    ids = torch.randint(0, 97, (1, 13))
    with torch.no_grad():
        ref, got = hf.eval()(input_ids=ids).logits, ours.eval()(input_ids=ids).logits
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max())


def test_merge_gives_same_logits():
    _, ours = _peft_pair("llama2")
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        before = ours(input_ids=ids).logits
        merge_lora(ours)
        after = ours(input_ids=ids).logits
    assert ours.lora_config is None and not list(lora_modules(ours))
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5 * before.abs().max())


def test_save_refuses_to_clobber(tmp_path):
    _, ours = _peft_pair("llama2")
    save_adapter(ours, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="adapter_config.json"):
        save_adapter(ours, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    save_adapter(ours, tmp_path, overwrite=True)


def test_bad_adapter_dirs(tmp_path):
    _, ours = make_pair("llama2")
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_adapter(ours, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}')
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        load_adapter(ours, tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    _, ours = make_pair("llama2")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_adapter(ours, tmp_path)
