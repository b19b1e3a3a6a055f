"""merged_16bit on the real SmolLM2 with a LoRA adapter: transformers loads it and gives the adapter's logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer



def relative_error(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


# bf16 storage of every merged weight (relative rounding 2^-9) through 30 layers; measured 7.9e-3
BF16_LOGITS_BOUND = 2e-2


@pytest.fixture(scope="session")
def hf_merged(merged_dir):
    return AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()


def test_transformers_logits_match_the_adapter_model(hf_merged, chat_ids, adapter_logits):
    with torch.no_grad():
        got = hf_merged(input_ids=chat_ids).logits
    assert relative_error(got, adapter_logits) <= BF16_LOGITS_BOUND
    assert (got.argmax(-1) == adapter_logits.argmax(-1)).float().mean() >= 0.95


def test_shards_index_config_and_tokenizer(merged_dir, lora_smollm2):
    model, tok = lora_smollm2
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in merged_dir.glob("model-*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]  # 270 MB in bf16, 100 MB shards
    assert sorted(set(index["weight_map"].values())) == shards
    assert "lm_head.weight" not in index["weight_map"]  # tied embeddings stored once
    assert len(index["weight_map"]) == 1 + 30 * 9 + 1
    assert index["metadata"]["total_size"] == sum(p.numel() for p in model.parameters()
                                                  if p.requires_grad is False) * 2
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and "quantization_config" not in config
    gen = json.loads((merged_dir / "generation_config.json").read_text())
    assert tok.eos_token_id in ([gen["eos_token_id"]] if isinstance(gen["eos_token_id"], int) else gen["eos_token_id"])
    reloaded = AutoTokenizer.from_pretrained(str(merged_dir))
    assert reloaded.chat_template == tok.chat_template
    text = "Hello 123, naïve café!"
    assert reloaded(text)["input_ids"] == tok(text)["input_ids"]
    assert not list(merged_dir.parent.glob(".merged*"))  # no temp dir left beside it


def test_greedy_generation_agrees(hf_merged, lora_smollm2):
    model, tok = lora_smollm2
    enc = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    ref = hf_merged.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        got = model.generate(**enc, max_new_tokens=16)
    assert got.tolist() == ref.tolist()
