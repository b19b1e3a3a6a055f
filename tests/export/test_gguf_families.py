"""GGUF export of the Gemma and Phi-3 families in llama.cpp's architectures: (1 + w) norms, sandwich-norm names,
soft-cap and sliding-window keys, Phi-3's fused tensors and LongRoPE factors; pronghorn reads the files back.
transformers' GGUF loader on Gemma 2 / 3 and Phi-3 files: tests/export/test_gguf_writer.py."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from helpers import make_pair, randomize_lora_b
from pronghorn.export.gguf_writer import save_gguf
from pronghorn.export.merged import merged_state_dict
from pronghorn.models.hf_layout import fuse_split
from pronghorn.models.gguf_loading import gguf_field
from pronghorn.models.lora import LoRAConfig, attach_lora


def _with_adapter(name):
    hf, model = make_pair(name)
    attach_lora(model, LoRAConfig(r=2, lora_alpha=4), seed=0)
    randomize_lora_b(model, scale=0.1)
    return hf, model


def test_gemma_norms_are_stored_plus_one(tmp_path, tiny_tokenizer):
    _, model = _with_adapter("gemma")
    save_gguf(model, tmp_path / "g", tiny_tokenizer, "f32")
    r = GGUFReader(tmp_path / "g" / "model.F32.gguf")
    assert gguf_field(r, "general.architecture") == "gemma"
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    assert "output.weight" not in tensors  # tied head
    want = model.model.layers[1].post_attention_layernorm.weight.detach().numpy() + 1
    np.testing.assert_array_equal(tensors["blk.1.ffn_norm.weight"], want)
    np.testing.assert_array_equal(tensors["output_norm.weight"], model.model.norm.weight.detach().numpy() + 1)


def test_gemma2_metadata_and_sandwich_names(tmp_path, tiny_tokenizer):
    _, model = _with_adapter("gemma2")
    with pytest.warns(UserWarning, match="query_pre_attn_scalar"):  # 24 here: see the last test
        save_gguf(model, tmp_path / "g", tiny_tokenizer, "f32")
    r = GGUFReader(tmp_path / "g" / "model.F32.gguf")
    assert gguf_field(r, "general.architecture") == "gemma2"
    assert (gguf_field(r, "gemma2.attn_logit_softcapping"), gguf_field(r, "gemma2.final_logit_softcapping")) == (1.5, 3.0)
    assert gguf_field(r, "gemma2.attention.sliding_window") == 5 and gguf_field(r, "gemma2.attention.key_length") == 16
    names = {t.name for t in r.tensors if t.name.startswith("blk.0.") and "norm" in t.name}
    assert names == {f"blk.0.{n}.weight" for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")}


@pytest.mark.parametrize("name", ["gemma", "gemma2_gguf", "gemma3_text", "gemma3_text_gguf"])
def test_pronghorn_reads_its_gguf_back_to_the_same_logits(name, tmp_path, tiny_tokenizer):
    """Norms back to w, soft-caps, window, layer pattern and both RoPE bases from the metadata."""
    from pronghorn.models.builder import build_model
    from pronghorn.models.config import ModelConfig
    from pronghorn.models.gguf_loading import read_gguf

    _, model = _with_adapter(name)
    save_gguf(model, tmp_path / "g", tiny_tokenizer, "f32")
    ckpt = read_gguf(tmp_path / "g" / "model.F32.gguf")
    cfg = ModelConfig.from_hf_dict(ckpt.config)
    assert cfg.parts == model.config.parts and cfg.layer_types == model.config.layer_types
    assert (cfg.rope, cfg.local_rope) == (model.config.rope, model.config.local_rope)
    loaded = build_model(cfg, ckpt.state_dict, torch.float32)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model.eval()(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_llama_cpp_attention_scale_mismatch_warns(tmp_path, tiny_tokenizer):
    _, model = make_pair("gemma2")  # query_pre_attn_scalar 24, head_dim 16
    with pytest.warns(UserWarning, match="query_pre_attn_scalar 24 is not stored in GGUF"):
        save_gguf(model, tmp_path / "g", tiny_tokenizer, "f32")


def test_phi3_fused_tensors_and_longrope_metadata(tmp_path, tiny_tokenizer):
    _, model = _with_adapter("phi3_longrope")
    save_gguf(model, tmp_path / "g", tiny_tokenizer, "f32")
    r = GGUFReader(tmp_path / "g" / "model.F32.gguf")
    assert gguf_field(r, "general.architecture") == "phi3"
    assert gguf_field(r, "phi3.rope.scaling.original_context_length") == 16
    assert gguf_field(r, "phi3.rope.scaling.attn_factor") == pytest.approx((1 + np.log(4) / np.log(16)) ** 0.5, rel=1e-6)
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    np.testing.assert_array_equal(tensors["rope_factors_long.weight"], model.config.rope["long_factor"])
    merged = merged_state_dict(model, torch.float32)
    np.testing.assert_array_equal(tensors["blk.1.attn_qkv.weight"], merged["model.layers.1.self_attn.qkv_proj.weight"])
    np.testing.assert_array_equal(tensors["blk.0.ffn_up.weight"], merged["model.layers.0.mlp.gate_up_proj.weight"])
    assert not any(".attn_q." in n or "ffn_gate" in n for n in tensors)
    _, partial = make_pair("phi3_partial_sliding")
    save_gguf(partial, tmp_path / "p", tiny_tokenizer, "f32")
    r = GGUFReader(tmp_path / "p" / "model.F32.gguf")
    assert (gguf_field(r, "phi3.rope.dimension_count"), gguf_field(r, "phi3.attention.sliding_window")) == (6, 5)


@pytest.mark.parametrize("name", ["phi3_gguf", "phi3_longrope", "phi3_partial_sliding"])
def test_phi3_gguf_loads_back_through_from_pretrained(name, tmp_path, tiny_tokenizer):
    """attn_qkv / ffn_up read as the fused qkv_proj / gate_up_proj and split; LongRoPE from its factor tensors and
    original context, partial rotary from the rope dimension count, the sliding window. F32: the merged weights
    bitwise, and the adapter model's logits within 1e-5 of the largest (merged vs unmerged adapter; 40 tokens:
    past the original context and the window); F16: the merged weights rounded to fp16 (matrices; norms and
    factor tables stay F32), bitwise."""
    from pronghorn.api import FastLanguageModel
    from pronghorn.models.gguf_loading import read_gguf

    _, model = _with_adapter(name)
    save_gguf(model, tmp_path / "g", tiny_tokenizer, ["f32", "f16"])
    loaded, _ = FastLanguageModel.from_pretrained(str(tmp_path / "g" / "model.F32.gguf"), dtype=torch.float32,
                                                  device="cpu")
    cfg, want = loaded.config, model.config
    rope = {k: v for k, v in want.rope.items() if k != "partial_rotary_factor"}  # transformers' copy; see parts
    assert (cfg.rope, cfg.parts, cfg.layer_types, cfg.sliding_window) == (rope, want.parts, want.layer_types,
                                                                         want.sliding_window)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref = loaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    fused = dict(fuse_split(cfg, merged_state_dict(model, torch.float32).items()))
    full, half = (read_gguf(tmp_path / "g" / f"model.{t}.gguf").state_dict for t in ("F32", "F16"))
    assert full.keys() == half.keys() == fused.keys()
    for key, w in fused.items():
        assert torch.equal(full[key], w) and torch.equal(half[key], w.half().float() if w.dim() == 2 else w), key


@pytest.mark.parametrize("name", ["gemma", "gemma2_gguf", "gemma3_text_gguf", "mistral_nemo_headdim"])
def test_gemma_and_nemo_gguf_load_through_from_pretrained(name, tmp_path, tiny_tokenizer):
    """What a user does with the file: ``FastLanguageModel.from_pretrained`` on it gives the adapter model's logits
    (merged on export) and its family's parts, layer pattern and head size (Nemo: head_dim != hidden / heads)."""
    from pronghorn.api import FastLanguageModel

    _, model = _with_adapter(name)
    save_gguf(model, tmp_path / "g", tiny_tokenizer, "f32")
    loaded, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path / "g" / "model.F32.gguf"),
                                                          dtype=torch.float32, device="cpu")
    cfg, want = loaded.config, model.config
    assert (cfg.parts, cfg.layer_types, cfg.head_dim) == (want.parts, want.layer_types, want.head_dim)
    assert tokenizer("hello world")["input_ids"] == tiny_tokenizer("hello world")["input_ids"]
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref = loaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5
