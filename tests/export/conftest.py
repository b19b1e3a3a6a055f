"""Shared export fixtures: the real SmolLM2 with a non-zero LoRA adapter, and its exports (written once)."""

import pytest
import torch

from helpers import make_tiny_tokenizer

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."},
        {"role": "assistant", "content": "The capital of France is Paris."}]


@pytest.fixture(scope="session")
def lora_smollm2(smollm2_dir):
    """(model with a trained-looking LoRA adapter on every projection, tokenizer), fp32 on the CPU."""
    from pronghorn import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained("default", dtype=torch.float32, device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=1,
                                             use_gradient_checkpointing=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval(), tok


@pytest.fixture(scope="session")
def chat_ids(lora_smollm2):
    tok = lora_smollm2[1]
    enc = tok.apply_chat_template(CHAT, return_tensors="pt", return_dict=True)
    return enc["input_ids"]


@pytest.fixture(scope="session")
def adapter_logits(lora_smollm2, chat_ids):
    with torch.no_grad():
        return lora_smollm2[0](input_ids=chat_ids).logits.float()


@pytest.fixture(scope="session")
def merged_dir(lora_smollm2, tmp_path_factory):
    model, tok = lora_smollm2
    out = tmp_path_factory.mktemp("export") / "merged"
    model.save_pretrained_merged(out, tok, save_method="merged_16bit", max_shard_size="100MB")
    return out


@pytest.fixture(scope="session")
def gguf_dir(lora_smollm2, tmp_path_factory):
    model, tok = lora_smollm2
    out = tmp_path_factory.mktemp("export") / "gguf"
    model.save_pretrained_gguf(out, tok, quantization_method=["f16", "q8_0"])
    return out



@pytest.fixture
def tiny_tokenizer():
    """A small byte-level BPE tokenizer with a chat template (fits the 97-row tiny models of tests/helpers.py)."""
    return make_tiny_tokenizer()
