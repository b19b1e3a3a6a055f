"""Gemma against transformers' GemmaForCausalLM: sqrt(hidden) embedding scale, (1 + w) RMSNorm, GeGLU (tanh).
Logits/loss with padding: tests/models/test_decoder_vs_hf.py; LoRA gradients: test_lora_vs_peft.py."""

import torch

from family_cases import check_generation_with_cache, check_packed_rows
from helpers import make_pair
from pronghorn.models.config import ModelConfig


def test_packed_rows_match_hf_alone():
    check_packed_rows("gemma")


def test_generation_with_cache_matches_hf():
    check_generation_with_cache("gemma")


def test_parts_and_tied_head():
    _, ours = make_pair("gemma")
    parts = ours.config.parts
    assert parts.activation == "gelu_tanh" and parts.norm_offset == 1.0 and parts.embed_scale == 48 ** 0.5
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_legacy_gelu_means_tanh():
    d = dict(model_type="gemma", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
             num_attention_heads=1, hidden_act="gelu")
    assert ModelConfig.from_hf_dict(d).parts.activation == "gelu_tanh"


def test_embedding_scale_is_rounded_to_the_table_dtype():
    _, ours = make_pair("gemma", dtype=torch.bfloat16)
    ids = torch.tensor([[5, 6]])
    want = ours.model.embed_tokens(ids) * torch.tensor(48 ** 0.5).to(torch.bfloat16)
    captured = {}

    def grab(module, args):
        captured["x"] = args[0]

    hook = ours.model.layers[0].register_forward_pre_hook(grab)
    with torch.no_grad():
        ours(input_ids=ids)
    hook.remove()
    assert torch.equal(captured["x"], want)


def test_norm_equals_transformers_gemma_rmsnorm_bit_for_bit_in_bf16():
    """(1 + w) scales the fp32 row and the result is rounded once, as GemmaRMSNorm does (not Llama's order)."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    from pronghorn.models.norm import RMSNorm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 9, 48, generator=g) * 3).to(torch.bfloat16)
    ref = GemmaRMSNorm(48, eps=1e-6)
    ours = RMSNorm(48, 1e-6, offset=1.0)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(48, generator=g) * 0.3)
        ours.weight.copy_(ref.weight)
        ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
        assert torch.equal(ours(x), ref(x))
