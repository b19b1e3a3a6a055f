"""GGUF f16 / q8_0 of the real SmolLM2 with a LoRA adapter, read back by gguf-py, transformers and pronghorn.

Error bounds (max |logit error| / max |logit| against the fp32 adapter model, on a 30-token chat):
- F16: each weight rounded to fp16 (relative 2^-11); measured 1.3e-3, bound 5e-3.
- Q8_0: 8-bit codes per block of 32 with an fp16 scale (relative step <= 1/127 of the block max); measured
  3.5e-2, bound 7e-2; the top-1 token agrees at >= 95% of positions.
transformers' GGUF loader and pronghorn's own GGUF reader dequantize the same file to the same model: their
logits agree to 1e-5.
"""

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from pronghorn.models.default_model import find_default_gguf
from pronghorn.models.gguf_loading import gguf_field, read_gguf

BOUNDS = {"model.F16.gguf": 5e-3, "model.Q8_0.gguf": 7e-2}


def relative_error(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module")
def hf_from_gguf(gguf_dir):
    return {name: AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=name, dtype=torch.float32).eval()
            for name in BOUNDS}


@pytest.fixture(scope="module")
def readers(gguf_dir):
    """Parsed once: gguf-py's reader spends most of its time on the 49k-token vocabulary."""
    return {name: GGUFReader(gguf_dir / name) for name in BOUNDS}


def test_metadata_and_tensor_types(readers, lora_smollm2):
    cfg = lora_smollm2[0].config
    for name, kind in (("model.F16.gguf", "F16"), ("model.Q8_0.gguf", "Q8_0")):
        r = readers[name]
        assert gguf_field(r, "general.architecture") == "llama"
        expect = {"context_length": 8192, "embedding_length": 576, "block_count": 30, "feed_forward_length": 1536,
                  "attention.head_count": 9, "attention.head_count_kv": 3, "rope.dimension_count": 64,
                  "rope.freq_base": 100000.0, "attention.layer_norm_rms_epsilon": 1e-5, "vocab_size": 49152}
        assert {k: gguf_field(r, f"llama.{k}") for k in expect} == expect
        assert cfg.vocab_size == expect["vocab_size"]
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
        assert len(types) == 1 + 30 * 9 + 1
        assert {types[n] for n in types if n.endswith("norm.weight")} == {"F32"}
        assert {types[n] for n in types if not n.endswith("norm.weight")} == {kind}


def test_tokenizer_metadata_matches_llama_cpp_conversion(readers, lora_smollm2):
    """Tokens, merges and token types equal those llama.cpp's converter wrote into the shipped SmolLM2 GGUF."""
    tok = lora_smollm2[1]
    ours, theirs = readers["model.F16.gguf"], GGUFReader(find_default_gguf())
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert gguf_field(ours, key) == gguf_field(theirs, key), key
    # the cached HF tokenizer splits digits as GPT-2 does, and the GGUF says so (llama.cpp's original: "smollm")
    assert gguf_field(ours, "tokenizer.ggml.pre") == "gpt-2"
    assert gguf_field(ours, "tokenizer.ggml.eos_token_id") == tok.eos_token_id == 2
    assert gguf_field(ours, "tokenizer.ggml.add_eos_token") is False


def test_transformers_gguf_tokenizer_encodes_like_the_original(gguf_dir, lora_smollm2):
    tok = lora_smollm2[1]
    again = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file="model.F16.gguf")
    chat = [{"role": "user", "content": "Hi! What's 2+2?"}]
    for text in ("Hello world, naïve café: 1234 <|im_start|>user\nok<|im_end|>",
                 tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)):
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.eos_token_id == tok.eos_token_id and again.bos_token_id == tok.bos_token_id


@pytest.mark.slow  # transformers' GGUF loader parses the 49k-token vocabulary several times: ~20 s CPU per file
@pytest.mark.parametrize("name", list(BOUNDS))
def test_transformers_logits_within_quantization_error(hf_from_gguf, gguf_dir, name, chat_ids, adapter_logits):
    with torch.no_grad():
        got = hf_from_gguf[name](input_ids=chat_ids).logits
    assert relative_error(got, adapter_logits) <= BOUNDS[name]
    assert (got.argmax(-1) == adapter_logits.argmax(-1)).float().mean() >= 0.95


@pytest.mark.slow
def test_pronghorn_reads_our_gguf_like_transformers(hf_from_gguf, gguf_dir, chat_ids):
    from pronghorn.models.builder import build_model
    from pronghorn.models.config import ModelConfig

    ckpt = read_gguf(gguf_dir / "model.Q8_0.gguf")
    ours = build_model(ModelConfig.from_hf_dict(ckpt.config), ckpt.state_dict, torch.float32)
    hf = hf_from_gguf["model.Q8_0.gguf"]
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight"):
        assert np.array_equal(ckpt.state_dict[name].numpy(), hf.state_dict()[name].numpy())  # same q/k un-permute
    with torch.no_grad():
        assert relative_error(ours(input_ids=chat_ids).logits, hf(input_ids=chat_ids).logits) <= 1e-5


@pytest.mark.slow
def test_greedy_generation_agrees_with_merged(hf_from_gguf, lora_smollm2):
    model, tok = lora_smollm2
    enc = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=16)
    got = hf_from_gguf["model.F16.gguf"].generate(**enc, max_new_tokens=16, do_sample=False,
                                                  pad_token_id=tok.pad_token_id)
    assert got.tolist() == ref.tolist()


def test_modelfile_beside_the_gguf(gguf_dir):
    text = (gguf_dir / "Modelfile").read_text()
    assert text.startswith("FROM ./model.F16.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert "<|im_start|>{{ .Role }}" in text
