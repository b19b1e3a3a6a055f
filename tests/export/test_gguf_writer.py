"""GGUF writer on tiny models of each family: tensors read back exactly (f32), rope metadata, llama.cpp layout."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from helpers import make_pair

from pronghorn.export.gguf_writer import llama3_rope_factors, permute_for_llama_cpp, save_gguf
from pronghorn.models.gguf_loading import gguf_field, unpermute_rope_rows, read_gguf
from pronghorn.models.lora import LoRAConfig, attach_lora
from pronghorn.models.rope_scaling import rope_inv_freq


def _with_adapter(name):
    _, model = make_pair(name)
    attach_lora(model, LoRAConfig(r=2, lora_alpha=4), seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    return model


@pytest.mark.parametrize("name", ["llama2", "smollm2_tied", "qwen2_bias", "llama_linear_rope", "llama_yarn_rope"])
def test_f32_round_trip_through_pronghorn_reader(name, tmp_path, tiny_tokenizer):
    from pronghorn.export.merged import merged_state_dict

    model = _with_adapter(name)
    save_gguf(model, tmp_path / "g", tiny_tokenizer, "f32")
    ckpt = read_gguf(tmp_path / "g" / "model.F32.gguf")
    want = merged_state_dict(model, torch.float32)
    assert set(ckpt.state_dict) - {"lm_head.weight"} == set(want) - {"lm_head.weight"}
    for key, value in want.items():
        assert torch.equal(ckpt.state_dict[key], value), key
    cfg = model.config
    assert ckpt.config["tie_word_embeddings"] == cfg.tie_word_embeddings
    assert ckpt.config["num_key_value_heads"] == cfg.num_key_value_heads
    assert ckpt.config["rope_theta"] == cfg.rope["rope_theta"]
    kind = cfg.rope["rope_type"]
    assert (ckpt.config["rope_scaling"] or {}).get("rope_type", "default") == kind
    if kind != "default":
        assert ckpt.config["rope_scaling"]["factor"] == cfg.rope["factor"]


def test_llama3_rope_freqs_tensor_reproduces_the_scaled_frequencies(tmp_path, tiny_tokenizer):
    model = _with_adapter("llama3_gqa_rope_scaling")
    save_gguf(model, tmp_path / "g", tiny_tokenizer, "f16")
    r = GGUFReader(tmp_path / "g" / "model.F16.gguf")
    freqs = {t.name: t for t in r.tensors}["rope_freqs.weight"]
    assert freqs.tensor_type.name == "F32"
    cfg = model.config
    base, _ = rope_inv_freq({"rope_type": "default", "rope_theta": cfg.rope["rope_theta"]}, cfg.head_dim, 64)
    scaled, _ = rope_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
    np.testing.assert_allclose(base.numpy() / np.asarray(freqs.data), scaled.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(freqs.data), llama3_rope_factors(cfg.rope, cfg.head_dim))


def test_permutation_is_llama_cpp_layout_and_inverts():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)  # 4 heads of dim 8
    p = permute_for_llama_cpp(w, 4)
    np.testing.assert_array_equal(unpermute_rope_rows(p, 4), w)
    # llama.cpp interleaves rope pairs: row 2i of a head is HF row i, row 2i+1 is HF row i + d/2
    np.testing.assert_array_equal(p[0:4, 0], w[[0, 4, 1, 5], 0])


def test_vocab_padded_to_embedding_rows_and_metadata(tmp_path, tiny_tokenizer):
    model = _with_adapter("smollm2_tied")
    tok = tiny_tokenizer
    save_gguf(model, tmp_path / "g", tok, "q8_0")
    r = GGUFReader(tmp_path / "g" / "model.Q8_0.gguf")
    tokens, types = gguf_field(r, "tokenizer.ggml.tokens"), gguf_field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == model.config.vocab_size == 97
    assert tokens[: len(tok)] == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert tokens[len(tok)] == f"[PAD{len(tok)}]" and types[len(tok)] == 5  # UNUSED
    assert types[:3] == [3, 3, 3]  # special tokens are CONTROL
    assert gguf_field(r, "tokenizer.ggml.merges") == ["Ġ t", "h e", "Ġt he"]
    assert gguf_field(r, "tokenizer.ggml.model") == "gpt2" and gguf_field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert gguf_field(r, "tokenizer.chat_template") == tok.chat_template
    assert gguf_field(r, "general.file_type") == 7 and gguf_field(r, "general.quantization_version") == 2
    # 48-wide rows: not a multiple of Q8_0's 32-value blocks -> F16 fallback
    assert {t.tensor_type.name for t in r.tensors if len(t.shape) == 2} == {"F16"}


@pytest.mark.parametrize("name", ["llama2", "smollm2_tied", "qwen2_bias", "gemma2_gguf", "gemma3_text_gguf",
                                  "phi3_gguf"])
def test_transformers_gguf_loader_gives_the_same_logits(name, tmp_path, tiny_tokenizer):
    """transformers' GGUF loader (its own q/k un-permute) on our f32 file = the HF model with merged weights."""
    from transformers import AutoModelForCausalLM

    from pronghorn.export.merged import merged_state_dict

    hf, _ = make_pair(name)
    model = _with_adapter(name)
    hf.load_state_dict(merged_state_dict(model, torch.float32), strict=False)
    save_gguf(model, tmp_path / "g", tiny_tokenizer, "f32")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "g"), gguf_file="model.F32.gguf",
                                                  dtype=torch.float32).eval()
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = hf(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
