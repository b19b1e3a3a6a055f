"""PEFT's ``rank_pattern`` / ``alpha_pattern`` (per-module ranks and alphas, matched as peft's ``get_pattern_key``
does): PEFT adapters with them load with PEFT's logits, our own Phi-3 adapter (saved on the fused modules with
patterns) loads back through FastLanguageModel.from_pretrained, and an adapter loaded with patterns saves again
to an adapter PEFT loads to the same logits. fp32 at the families' RTOL (tests/family_cases.py)."""

import pytest
import torch

from family_cases import RTOL, rel
from helpers import make_pair, make_tiny_tokenizer, randomize_lora_b
from pronghorn.api import FastLanguageModel
from pronghorn.errors import CheckpointError
from pronghorn.export.adapter import save_adapter
from pronghorn.models.adapter_format import load_adapter
from pronghorn.models.lora import LoRAConfig, lora_modules

IDS = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(9))
# (tiny config, PEFT's target_modules, rank_pattern, alpha_pattern): short names, regexes and full names
CASES = {
    "llama": ("llama3_gqa_rope_scaling", ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
              {"q_proj": 2, r"layers\.1\.self_attn\.k_proj": 6, "model.layers.0.mlp.down_proj": 5},
              {"v_proj": 3.0, r".*\.1\.self_attn\.(q|o)_proj": 11}),
    "phi3": ("phi3_longrope", ["qkv_proj", "o_proj", "gate_up_proj"],
             {"qkv_proj": 6, r"layers\.1\.mlp\.gate_up_proj": 2}, {"gate_up_proj": 7, "o_proj": 2}),
}


def _peft_adapter(name, tmp_path):
    import peft

    config_name, targets, ranks, alphas = CASES[name]
    hf, ours = make_pair(config_name)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern=ranks,
                                                 alpha_pattern=alphas))
    randomize_lora_b(hf)
    hf.save_pretrained(tmp_path / "peft")
    return hf.eval(), ours


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_adapter_with_patterns_loads_with_peft_logits(name, tmp_path):
    hf, ours = _peft_adapter(name, tmp_path)
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        ref, got = hf(input_ids=IDS).logits, ours.eval()(input_ids=IDS).logits
    assert rel(got, ref) <= RTOL
    ranks = {n: m.lora_A.shape[0] for n, m in lora_modules(ours)}
    if name == "llama":  # the first matching key wins, a key matches a whole name or its end after a dot
        assert (ranks["model.layers.0.self_attn.q_proj"], ranks["model.layers.1.self_attn.k_proj"]) == (2, 6)
        assert (ranks["model.layers.0.self_attn.k_proj"], ranks["model.layers.0.mlp.down_proj"]) == (4, 5)
    else:  # a fused module's rank and alpha are each of its parts'
        assert ranks["model.layers.0.self_attn.k_proj"] == 6 and ranks["model.layers.1.mlp.up_proj"] == 2
    save_adapter(ours, tmp_path / "again", base_model_name_or_path="tiny")
    _assert_peft_loads_to(ours, tmp_path / "again", CASES[name][0])


def _assert_peft_loads_to(ours, adapter_dir, config_name):
    import peft

    base, _ = make_pair(config_name)
    loaded = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        assert rel(ours.eval()(input_ids=IDS).logits, loaded(input_ids=IDS).logits) <= RTOL


def test_our_phi3_adapter_loads_back_through_from_pretrained(tmp_path):
    """Saved on qkv_proj / gate_up_proj with rank_pattern / alpha_pattern (rslora too), read back to the same
    logits; saved again (each part now rank 3r or 2r) it still loads in PEFT to them."""
    hf, _ = make_pair("phi3_partial_sliding")
    hf.save_pretrained(tmp_path / "base")
    make_tiny_tokenizer().save_pretrained(tmp_path / "base")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "base"), dtype=torch.float32, device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=3, lora_alpha=5, use_rslora=True, random_state=2,
                                             target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), dtype=torch.float32, device="cpu")
    assert loaded.lora_config.rank_pattern == {"qkv_proj": 6, "gate_up_proj": 6}
    with torch.no_grad():
        assert rel(loaded.eval()(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits) <= RTOL
    save_adapter(loaded, tmp_path / "again", base_model_name_or_path=str(tmp_path / "base"))
    _assert_peft_loads_to(loaded, tmp_path / "again", "phi3_partial_sliding")


def test_bad_patterns_are_refused(tmp_path):
    _, ours = _peft_adapter("llama", tmp_path)
    config = (tmp_path / "peft" / "adapter_config.json")
    config.write_text(config.read_text().replace('"q_proj": 2', '"q_proj(": 2'))
    with pytest.raises(CheckpointError, match="not a valid regular expression"):
        load_adapter(ours, tmp_path / "peft")
    with pytest.raises(Exception, match="positive rank"):
        LoRAConfig(rank_pattern={"q_proj": 0})


def test_peft_adapter_with_regex_target_modules_loads_with_peft_logits(tmp_path):
    """A regex ``target_modules`` (PEFT fullmatches it against each module name) loads as the projections and layers
    it picks; one that picks different projections in different layers is refused clearly."""
    import json

    import peft

    hf, ours = make_pair("llama3_gqa_rope_scaling")
    regex = r"model\.layers\.1\..*\.(q_proj|v_proj|down_proj)"
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=regex))
    randomize_lora_b(hf)
    hf.save_pretrained(tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft")
    assert ours.lora_config.target_modules == ["q_proj", "v_proj", "down_proj"]
    assert ours.lora_config.layers_to_transform == [1]
    with torch.no_grad():
        assert rel(ours.eval()(input_ids=IDS).logits, hf.eval()(input_ids=IDS).logits) <= RTOL
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config["target_modules"] = r"model\.layers\.(0\..*\.q_proj|1\..*\.v_proj)"
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    _, other = make_pair("llama3_gqa_rope_scaling")
    with pytest.raises(CheckpointError, match="same projections in every chosen layer"):
        load_adapter(other, tmp_path / "peft")
