"""Phi-3 against transformers' Phi3ForCausalLM: fused qkv_proj / gate_up_proj split on load, LongRoPE short and
long factors, partial rotary, sliding window; LoRA against PEFT on the fused modules. Logits/loss with padding:
tests/models/test_decoder_vs_hf.py."""

import pytest
import torch
import torch.nn.functional as F

from family_cases import RTOL, check_generation_with_cache, check_long_unpadded, check_packed_rows, rel
from helpers import make_pair
from pronghorn.models.lora import LoRAConfig, attach_lora, lora_modules


@pytest.mark.parametrize("name,length", [("phi3_longrope", 12), ("phi3_longrope", 40), ("phi3_partial_sliding", 40)])
def test_unpadded_matches_hf(name, length):
    """12 tokens: LongRoPE's short factors; 40: its long ones, and past the sliding window."""
    check_long_unpadded(name, length)


def test_long_factors_are_exercised():
    _, ours = make_pair("phi3_longrope")
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        long = ours(input_ids=ids).logits[:, :12]
        short = ours(input_ids=ids[:, :12]).logits
    assert rel(long, short) > 100 * RTOL  # the same 12 tokens, rotated with the other factors


def test_packed_rows_match_hf_alone():
    check_packed_rows("phi3_partial_sliding")


@pytest.mark.parametrize("name", ["phi3_longrope", "phi3_partial_sliding"])
def test_generation_with_cache_matches_hf(name):
    check_generation_with_cache(name, new_tokens=14)  # phi3_longrope: 7 + 14 tokens cross the original 16


def test_split_projections_and_parts():
    _, ours = make_pair("phi3_partial_sliding")
    attn, mlp = ours.model.layers[0].self_attn, ours.model.layers[0].mlp
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (48, 12, 12)
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == 80
    assert ours.config.parts.rotary_dim == 6 and ours.config.layer_types == ["sliding_attention"] * 2


def test_fused_target_names_mean_their_parts():
    cfg = LoRAConfig(target_modules=["qkv_proj", "o_proj", "gate_up_proj"])
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]


def test_lora_gradients_match_peft_on_the_fused_modules():
    """PEFT puts one adapter on qkv_proj (A shared, B stacked); ours puts one on each part. With every part's A
    equal to PEFT's and the Bs its row blocks, the functions agree: PEFT's dA is the parts' summed dA, its dB
    their stacked dB. In fp64 (norms still normalise in fp32 in both, the loss taken from the logits in fp64):
    in fp32 the two summation orders of dA differ by ~5e-7 of its largest entry."""
    import peft

    hf, ours = make_pair("phi3_longrope", dtype=torch.float64)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj",
                                                                                     "gate_up_proj", "down_proj"]))
    attach_lora(ours, LoRAConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj",
                                                                     "down_proj"]))
    groups = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    ours_mods = dict(lora_modules(ours))
    torch.manual_seed(5)
    pairs = []  # (PEFT module, our modules)
    with torch.no_grad():
        for i in range(2):
            for owner, fused, parts in (("self_attn", "qkv_proj", groups["qkv_proj"]), ("self_attn", "o_proj", None),
                                        ("mlp", "gate_up_proj", groups["gate_up_proj"]), ("mlp", "down_proj", None)):
                p = hf.get_submodule(f"base_model.model.model.layers.{i}.{owner}.{fused}")
                mods = [ours_mods[f"model.layers.{i}.{owner}.{n}"] for n in (parts or (fused,))]
                p.lora_B["default"].weight.normal_(0, 0.1)
                blocks = torch.split(p.lora_B["default"].weight, [m.out_features for m in mods])
                for m, b in zip(mods, blocks):
                    m.lora_A.copy_(p.lora_A["default"].weight)
                    m.lora_B.copy_(b)
                pairs.append((p, mods))
    ids = torch.randint(3, 97, (2, 19), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 4] = -100
    hf.train(), ours.train()
    for model in (hf, ours):
        logits = model(input_ids=ids, attention_mask=mask, return_logits=True).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100).backward()
    for p, mods in pairs:
        ref_a, ref_b = p.lora_A["default"].weight.grad, p.lora_B["default"].weight.grad
        got_a = sum(m.lora_A.grad for m in mods)
        got_b = torch.cat([m.lora_B.grad for m in mods])
        for got, ref in ((got_a, ref_a), (got_b, ref_b)):
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-7 * ref.abs().max())


@pytest.mark.parametrize("targets,rslora", [(["qkv_proj", "o_proj", "gate_up_proj"], False),
                                            (["q_proj", "v_proj", "up_proj", "down_proj"], True)])
def test_saved_adapter_loads_in_peft_on_the_fused_modules(tmp_path, targets, rslora):
    """Each part's own adapter, and untargeted parts (zero blocks), in PEFT's one adapter per fused module."""
    import peft

    from helpers import randomize_lora_b
    from pronghorn.export.adapter import save_adapter

    base, ours = make_pair("phi3_partial_sliding")
    attach_lora(ours, LoRAConfig(r=3, lora_alpha=5, target_modules=targets, use_rslora=rslora), seed=2)
    randomize_lora_b(ours)
    save_adapter(ours, tmp_path / "a", base_model_name_or_path="tiny-phi3")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref, got = loaded(input_ids=ids).logits, ours.eval()(input_ids=ids).logits
    assert rel(got, ref) <= RTOL


def test_peft_adapter_on_fused_modules_loads_in_pronghorn(tmp_path):
    import peft

    from helpers import randomize_lora_b
    from pronghorn.models.adapter_format import load_adapter

    hf, ours = make_pair("phi3_longrope")
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj",
                                                                                     "down_proj"]))
    randomize_lora_b(hf)
    hf.save_pretrained(tmp_path / "p")
    load_adapter(ours, tmp_path / "p")
    assert ours.lora_config.target_modules == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref, got = hf.eval()(input_ids=ids).logits, ours.eval()(input_ids=ids).logits
    assert rel(got, ref) <= RTOL
