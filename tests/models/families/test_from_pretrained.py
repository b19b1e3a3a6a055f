"""FastLanguageModel.from_pretrained on a transformers checkpoint directory of each new family (Phi-3's fused
tensors split on the way in), plain and QLoRA, gives transformers' logits."""

import pytest
import torch

from helpers import make_pair, make_tiny_tokenizer
from pronghorn.api import FastLanguageModel


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3_text", "phi3_longrope", "mistral_nemo_headdim"])
def test_checkpoint_dir_loads_to_transformers_logits(name, tmp_path):
    hf, _ = make_pair(name)
    hf.save_pretrained(tmp_path)
    make_tiny_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path), dtype=torch.float32, device="cpu")
    ids = torch.randint(3, 97, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, got = hf(input_ids=ids).logits, model(input_ids=ids).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    assert tokenizer is not None and model.config.model_type == hf.config.model_type


@pytest.mark.parametrize("name", ["phi3_longrope", "gemma", "gemma2", "gemma3_text", "mistral_nemo_headdim"])
def test_every_family_loads_in_4bit_and_trains(name, tmp_path):
    """``load_in_4bit=True`` from a family's checkpoint dir (Phi-3's fused projections split first), then a LoRA
    step: every projection NF4, the adapters' gradients finite and non-zero."""
    hf, _ = make_pair(name)
    hf.save_pretrained(tmp_path)
    make_tiny_tokenizer().save_pretrained(tmp_path)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), dtype=torch.float32, device="cpu", load_in_4bit=True)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.is_quantized and attn.v_proj.is_quantized and model.model.layers[0].mlp.up_proj.is_quantized
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # (B starts at 0: A gets none yet)
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
