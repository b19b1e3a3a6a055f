"""Merged export of every family in its own Hugging Face layout: transformers loads it to the adapter model's
logits (Phi-3's split projections fused again into qkv_proj / gate_up_proj)."""

import pytest
import torch
import transformers

from helpers import make_pair, randomize_lora_b
from pronghorn.export.merged import save_merged
from pronghorn.models.lora import LoRAConfig, attach_lora

FAMILIES = ["gemma", "gemma2", "gemma3_text", "phi3_longrope", "phi3_partial_sliding", "mistral_nemo_headdim"]


@pytest.mark.parametrize("name", FAMILIES)
def test_merged_checkpoint_loads_in_transformers_with_equal_logits(name, tmp_path):
    _, ours = make_pair(name)
    attach_lora(ours, LoRAConfig(r=4, lora_alpha=8), seed=3)
    randomize_lora_b(ours)
    save_merged(ours, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ids = torch.randint(3, 97, (2, 13), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, got = hf(input_ids=ids).logits, ours.eval()(input_ids=ids).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5
