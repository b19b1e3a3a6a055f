"""Shared test helpers: tiny configs of every family, built both as HF models and as pronghorn models."""

from __future__ import annotations

import torch
import transformers

from pronghorn.kernels import IGNORE_INDEX
from pronghorn.models.config import ModelConfig
from pronghorn.models.decoder import DecoderForCausalLM
from pronghorn.models.hf_layout import split_fused
from pronghorn.models.lora import LoRAConfig, attach_lora

_BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, hidden_act="silu")

_GEMMA = dict(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", head_dim=16,
              initializer_range=0.15, pad_token_id=0, bos_token_id=1, eos_token_id=2)

_PHI3 = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)

# name -> (transformers config class, model class, fields over _BASE; "attn": the transformers attention
# implementation to compare with, SDPA unless named)
TINY_CONFIGS = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3_gqa_rope_scaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama_linear_rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "llama_dynamic_rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        max_position_embeddings=8, rope_scaling=dict(rope_type="dynamic", factor=2.0))),
    "llama_yarn_rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16))),
    "llama_bias_headdim": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True, head_dim=16)),
    "smollm2_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=100000.0)),
    "mistral_sliding": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5, head_dim=16)),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2_sliding": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3_qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=False)),
    # Mistral Nemo / Small: head_dim (32) is not hidden / heads (12)
    "mistral_nemo_headdim": ("MistralConfig", "MistralForCausalLM", dict(head_dim=32, sliding_window=None)),
    # Gemma: weights drawn wider (initializer_range) so the GELU's tails and soft-capping are really exercised
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_GEMMA, tie_word_embeddings=True)),
    "gemma_mha_untied": ("GemmaConfig", "GemmaForCausalLM", dict(_GEMMA, num_key_value_heads=4,
                                                                 tie_word_embeddings=False)),
    # Gemma 2: transformers' class refuses SDPA; eager computes the soft-capped scores. Without caps, its SDPA
    # path (switched on after construction) is the same function and the same algorithm as ours
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        _GEMMA, query_pre_attn_scalar=24, sliding_window=5, attn_logit_softcapping=1.5,
        final_logit_softcapping=3.0, attn="eager")),
    "gemma2_no_softcap": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        _GEMMA, sliding_window=5, attn_logit_softcapping=None, final_logit_softcapping=None, attn="sdpa-after-init")),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        _GEMMA, query_pre_attn_scalar=16, sliding_window=5, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1000000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=10000.0)})),
    "gemma3_text_softcap": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(  # transformers ignores the attention cap
        _GEMMA, num_hidden_layers=3, sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=4.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    # what transformers' GGUF loader can rebuild: the default scalar, soft-caps (Gemma 2), RoPEs and layer pattern
    # (head_dim 256 = query_pre_attn_scalar, as transformers' GGUF loader and llama.cpp assume)
    "gemma2_gguf": ("Gemma2Config", "Gemma2ForCausalLM", dict(_GEMMA, head_dim=256, sliding_window=5, attn="eager")),
    "gemma3_text_gguf": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_GEMMA, head_dim=256, sliding_window=5)),
    # Phi-3: LongRoPE past an original context of 16 (the tests' 23 and 40 tokens take the long factors)
    "phi3_longrope": ("Phi3Config", "Phi3ForCausalLM", dict(
        _PHI3, original_max_position_embeddings=16, rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.1, 1.3, 1.7, 2.2, 3.0],
            long_factor=[1.0, 1.5, 2.5, 4.0, 6.5, 9.0]))),
    # what transformers' GGUF loader rebuilds of a Phi-3 (no RoPE scaling, partial rotary or window)
    "phi3_gguf": ("Phi3Config", "Phi3ForCausalLM", dict(_PHI3)),
    # Phi-4-mini-like: partial rotary (half the head) and a sliding window
    "phi3_partial_sliding": ("Phi3Config", "Phi3ForCausalLM", dict(
        _PHI3, partial_rotary_factor=0.5, sliding_window=5, num_key_value_heads=1)),
}


def make_pair(name: str, dtype=torch.float32, seed: int = 0):
    """(hf_model, pronghorn_model) with identical random weights."""
    cfg_cls, model_cls, extra = TINY_CONFIGS[name]
    kwargs = {**_BASE, **extra}
    attn = kwargs.pop("attn", "sdpa")  # transformers' attention implementation to compare with
    hf_cfg = getattr(transformers, cfg_cls)(**kwargs)
    hf_cfg._attn_implementation = "eager" if attn == "sdpa-after-init" else attn
    torch.manual_seed(seed)
    hf = getattr(transformers, model_cls)(hf_cfg).to(dtype).eval()
    if attn == "sdpa-after-init":
        hf.config._attn_implementation = "sdpa"
    with torch.no_grad():  # norms are ones by default; randomise them so they are tested
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    ours = DecoderForCausalLM(ModelConfig.from_hf_dict(hf_cfg.to_dict()), dtype=dtype)
    missing, unexpected = ours.load_state_dict(split_fused(ours.config, dict(hf.state_dict())), strict=False)
    assert not unexpected, unexpected
    assert all(k == "lm_head.weight" for k in missing), missing
    ours.tie_weights()
    return hf, ours.eval()


def tiny_lora_model(dropout=0.0, dtype=torch.float32):
    _, model = make_pair("llama3_gqa_rope_scaling", dtype=dtype)
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8, lora_dropout=dropout), seed=11)
    return model


def random_examples(n=16, seed=0):
    """Sequences of different lengths whose first few labels are masked (a 'prompt')."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(5, 21, (1,), generator=g))
        ids = torch.randint(3, 97, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 2, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def left_padded_batch(lengths, total=None, seed=0, pad=0):
    """(ids, attention mask) of random prompts of the given lengths, left-padded with ``pad`` to ``total``."""
    total = total or max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (len(lengths), total), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, total - n:] = 1
    return ids.masked_fill(mask == 0, pad), mask


@torch.no_grad()
def randomize_lora_b(model, seed=0, scale=0.3):
    """Non-zero adapters (fresh LoRA has B = 0, which would make every adapter test vacuous)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def make_tiny_tokenizer():
    """A small byte-level BPE tokenizer with a chat template (fits the 97-row tiny models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", ".", ","]
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for c in chars:
        vocab[c] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                         "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                         "{% endif %}")
    return tok


def random_pairs(n=6, seed=0, vocab=97):
    """Tokenized preference pairs of random ids and lengths (for a tiny model's vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()
    rows = []
    for _ in range(n):
        c, rj = r(2, 8), r(2, 8)
        cm = [1] * c
        cm[-1] = r(0, 2)  # sometimes an untrained template tail
        rows.append({"prompt_ids": ids(r(2, 9)), "chosen_ids": ids(c), "chosen_mask": cm,
                     "rejected_ids": ids(rj), "rejected_mask": [1] * rj})
    return rows


def random_kto_rows(n=6, seed=1):
    """Tokenized KTO rows (every third one undesirable)."""
    pairs = random_pairs(n, seed)
    return [{"prompt_ids": p["prompt_ids"], "completion_ids": p["chosen_ids"], "completion_mask": p["chosen_mask"],
             "label": i % 3 != 0} for i, p in enumerate(pairs)]


def preference_lora_model(seed=5):
    """The tiny LoRA model with every adapter weight moved off its initial value."""
    model = tiny_lora_model()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA B starts at zero; move it so policy != reference and every adapter has a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def moving_padding_batch(step: int, device="cpu", length: int = 12) -> dict:
    """A 2-row batch of ``step``'s random ids whose second row's padding moves with the step (what a graph copies
    in once a step must follow it)."""
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, 97, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 2 - step % 3:] = 0
    return {k: v.to(device) for k, v in
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}.items()}
