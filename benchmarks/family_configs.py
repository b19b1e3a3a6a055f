"""The non-Llama families' benchmark configs (issue 16 item 7) and the random-init checkpoint dirs every system loads.

Each config is a transformers config as keyword arguments plus its ``model_type`` (``AutoConfig.for_model``), with
the fields transformers 5.17 and 5.25 share (v5's ``rope_parameters``; Gemma 3's per-layer-type RoPE and
``layer_types``). Real configs: Gemma-2-9B, Phi-3.5-mini-instruct (LongRoPE factors as in its config.json) and the
text model of Gemma-3-4B; ``tiny-*``: the same families at toy sizes, for ``memory_budget.py --dry-run``.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Phi-3.5-mini-instruct's config.json, rope_scaling (48 = head_dim 96 / 2 values each)
_PHI35_SHORT = [1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705] + [1.0499999523162842] * 5 + [
    1.0699999332427979, 1.0999999046325684, 1.1099998950958252, 1.1599998474121094, 1.1599998474121094,
    1.1699998378753662, 1.2899998426437378, 1.339999794960022, 1.679999828338623, 1.7899998426437378,
    1.8199998140335083, 1.8499997854232788, 1.8799997568130493, 1.9099997282028198, 1.9399996995925903,
    1.9899996519088745] + [2.0199997425079346] * 6 + [2.0299997329711914] * 9 + [
    2.0799996852874756, 2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533,
    2.729999542236328, 2.749999523162842, 2.8399994373321533]
_PHI35_LONG = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062]
assert len(_PHI35_SHORT) == len(_PHI35_LONG) == 48


def _gemma3_layers(n: int, pattern: int = 6) -> list[str]:
    """Gemma 3's layer types: every ``pattern``-th layer global, the others sliding."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]


def _gemma3_rope(factor: float) -> dict:
    return {"full_attention": dict(rope_type="linear", factor=factor, rope_theta=1_000_000.0),
            "sliding_attention": dict(rope_type="default", rope_theta=10_000.0)}


def _phi35_rope(every: int = 1) -> dict:
    return dict(rope_type="longrope", rope_theta=10000.0, short_factor=_PHI35_SHORT[::every],
                long_factor=_PHI35_LONG[::every])


_GEMMA2 = dict(model_type="gemma2", hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
               attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True,
               rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2)
_PHI3 = dict(model_type="phi3", hidden_act="silu", tie_word_embeddings=False, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=32000, pad_token_id=32000)
_GEMMA3 = dict(model_type="gemma3_text", hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
               rms_norm_eps=1e-6, final_logit_softcapping=None, attn_logit_softcapping=None,
               pad_token_id=0, eos_token_id=1, bos_token_id=2)
_TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=1024)  # head_dim 16

FAMILY_CONFIGS = {
    "gemma-2-9b": dict(_GEMMA2, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                       sliding_window=4096, max_position_embeddings=8192),
    "phi-3.5-mini": dict(_PHI3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                         rope_parameters=_phi35_rope(), original_max_position_embeddings=4096,
                         max_position_embeddings=131072, sliding_window=262144),
    "gemma-3-4b": dict(_GEMMA3, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262208,
                       query_pre_attn_scalar=256, sliding_window=1024, max_position_embeddings=131072,
                       layer_types=_gemma3_layers(34), rope_parameters=_gemma3_rope(8.0)),
    # --dry-run: 128-token rows pass every sliding window and Phi-3's original context (the long factors)
    "tiny-gemma2": dict(_GEMMA2, **_TINY, num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
                        query_pre_attn_scalar=16, sliding_window=64, max_position_embeddings=512),
    "tiny-phi3": dict(_PHI3, **_TINY, num_hidden_layers=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2, rope_parameters=_phi35_rope(every=6), original_max_position_embeddings=64,
                      max_position_embeddings=512, sliding_window=None),
    "tiny-gemma3": dict(_GEMMA3, **_TINY, num_hidden_layers=6, num_key_value_heads=2, head_dim=16,
                        query_pre_attn_scalar=16, sliding_window=64, max_position_embeddings=512,
                        layer_types=_gemma3_layers(6), rope_parameters=_gemma3_rope(8.0)),
}


def add_tokenizer(d: Path, vocab_size: int) -> None:
    """A word-level tokenizer of exactly ``vocab_size`` ids beside the weights: random ids need no real one, and
    Unsloth and pronghorn both load the tokenizer of the dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab_size - 3)} | {"<unk>": vocab_size - 3, "<s>": vocab_size - 2,
                                                           "</s>": vocab_size - 1}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(str(d))


def write_checkpoint(d: Path, config: dict) -> str:
    """A random-init bf16 HF checkpoint of ``config`` (keyword arguments + ``model_type``) with a tokenizer at
    ``d``, built on the GPU when there is one; written beside ``d`` and renamed, so a killed run leaves no half dir."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(config)
    cfg = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    tmp = d.with_name(d.name + ".partial")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(tmp), safe_serialization=True)
    del model
    add_tokenizer(tmp, cfg.vocab_size)
    tmp.rename(d)
    return str(d)


if __name__ == "__main__":  # memory_budget.py writes each dir in its own process: the parent keeps no GPU memory
    import json
    import sys

    write_checkpoint(Path(sys.argv[1]), json.loads(sys.argv[2]))
