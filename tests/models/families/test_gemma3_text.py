"""Gemma 3 (text) against transformers' Gemma3ForCausalLM: (1 + w) q/k norms, local and global RoPE (the global
one linearly scaled), the sliding/global layer pattern, and the final softcap when a config sets it.
Logits/loss with padding: tests/models/test_decoder_vs_hf.py; LoRA gradients: test_lora_vs_peft.py."""

import pytest

from family_cases import check_generation_with_cache, check_long_unpadded, check_packed_rows
from helpers import make_pair
from pronghorn.models.config import ModelConfig

NAMES = ["gemma3_text", "gemma3_text_softcap"]


@pytest.mark.parametrize("name", NAMES)
def test_past_the_sliding_window_matches_hf(name):
    check_long_unpadded(name)


def test_packed_rows_match_hf_alone():
    check_packed_rows("gemma3_text")


def test_generation_with_cache_matches_hf():
    check_generation_with_cache("gemma3_text")


def test_two_ropes_and_layer_pattern():
    _, ours = make_pair("gemma3_text")
    cfg = ours.config
    assert cfg.rope["rope_type"] == "linear" and cfg.rope["rope_theta"] == 1e6
    assert cfg.local_rope == {"rope_type": "default", "rope_theta": 10000.0}
    assert [cfg.rope_of(i) for i in range(2)] == ["local", "global"]
    assert ours.model.layers[0].self_attn.q_norm.offset == 1.0


def test_old_config_spelling_and_default_pattern():
    d = dict(model_type="gemma3_text", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=7,
             num_attention_heads=1, head_dim=8, rope_theta=1e6, rope_local_base_freq=1e4, sliding_window=4,
             rope_scaling={"rope_type": "linear", "factor": 8.0})
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert cfg.rope == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert cfg.local_rope["rope_theta"] == 1e4 and cfg.parts.attn_softcap is None


def test_attention_softcap_is_ignored_as_transformers_does():
    _, ours = make_pair("gemma3_text_softcap")
    assert ours.config.parts.attn_softcap is None and ours.config.parts.final_softcap == 4.0
