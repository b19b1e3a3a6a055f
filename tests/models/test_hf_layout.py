"""A family's fused checkpoint tensors (Phi-3's qkv_proj, gate_up_proj): split on load, fused again on export."""

import pytest
import torch

from helpers import make_pair
from pronghorn.errors import CheckpointError
from pronghorn.models.builder import build_model
from pronghorn.models.hf_checkpoint import read_state_dict
from pronghorn.models.hf_layout import fuse_split, split_fused


def test_split_then_fuse_gives_the_checkpoint_back():
    hf, ours = make_pair("phi3_partial_sliding")
    original = {k: v.clone() for k, v in hf.state_dict().items()}
    split = split_fused(ours.config, dict(original))
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in split)
    assert split["model.layers.1.self_attn.k_proj.weight"].shape == (12, 48)
    fused = dict(fuse_split(ours.config, split.items()))
    assert fused.keys() == original.keys()
    assert all(torch.equal(fused[k], original[k]) for k in original)


def test_other_families_pass_through():
    hf, ours = make_pair("qwen2_bias")
    sd = dict(hf.state_dict())
    assert split_fused(ours.config, dict(sd)).keys() == sd.keys()
    assert [k for k, _ in fuse_split(ours.config, sd.items())] == list(sd)


def test_wrong_row_count_names_the_tensor():
    hf, ours = make_pair("phi3_partial_sliding")
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.qkv_proj.weight"] = sd["model.layers.0.self_attn.qkv_proj.weight"][:-1]
    with pytest.raises(CheckpointError, match=r"ckpt: tensor model\.layers\.0\.self_attn\.qkv_proj\.weight has 71"):
        split_fused(ours.config, sd, "ckpt")


def test_missing_part_on_export_is_an_error():
    _, ours = make_pair("phi3_partial_sliding")
    sd = {k: v for k, v in ours.state_dict().items() if "layers.0.self_attn.v_proj" not in k}
    with pytest.raises(CheckpointError, match="qkv_proj"):
        list(fuse_split(ours.config, sd.items()))


def test_transformers_checkpoint_dir_builds_the_same_model(tmp_path):
    hf, ours = make_pair("phi3_longrope")
    hf.save_pretrained(tmp_path)
    model = build_model(ours.config, split_fused(ours.config, read_state_dict(tmp_path)), torch.float32)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ours(input_ids=ids).logits)
