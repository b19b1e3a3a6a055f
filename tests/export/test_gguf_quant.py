"""Which GGML type each tensor gets per method (q4_k_m's Q6_K layers, block-size fallbacks) and name checks."""

import pytest

from pronghorn.errors import PronghornError
from pronghorn.export.gguf_quant import METHODS, resolve_methods, tensor_type

Q4KM = METHODS["q4_k_m"]


def test_q4_k_m_upgrades_output_and_some_v_and_down_layers():
    n = 32  # use_more_bits: first 4, last 4, and every third between
    six = [i for i in range(n) if tensor_type(Q4KM, f"blk.{i}.ffn_down.weight", (4096, 11008), n, True) == "Q6_K"]
    assert six == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert tensor_type(Q4KM, "blk.6.attn_v.weight", (1024, 4096), n, True) == "Q6_K"
    assert tensor_type(Q4KM, "blk.5.attn_v.weight", (1024, 4096), n, True) == "Q4_K"
    assert tensor_type(Q4KM, "blk.0.attn_q.weight", (4096, 4096), n, True) == "Q4_K"
    assert tensor_type(Q4KM, "output.weight", (32000, 4096), n, True) == "Q6_K"
    assert tensor_type(Q4KM, "token_embd.weight", (32000, 4096), n, True) == "Q4_K"
    assert tensor_type(Q4KM, "token_embd.weight", (32000, 4096), n, False) == "Q6_K"  # tied: it is the output
    assert tensor_type(Q4KM, "blk.0.attn_norm.weight", (4096,), n, True) == "F32"


def test_fallbacks_for_rows_that_are_not_whole_blocks():
    # SmolLM2: 576-wide rows are not whole 256-value k-quant blocks
    assert tensor_type(Q4KM, "blk.5.attn_q.weight", (576, 576), 30, False) == "Q5_0"
    assert tensor_type(Q4KM, "token_embd.weight", (49152, 576), 30, False) == "Q8_0"
    assert tensor_type(Q4KM, "blk.4.ffn_down.weight", (576, 1536), 30, False) == "Q4_K"
    assert tensor_type(Q4KM, "blk.5.ffn_down.weight", (576, 1536), 30, False) == "Q6_K"
    assert tensor_type(METHODS["q8_0"], "blk.0.attn_q.weight", (48, 48), 2, False) == "F16"
    assert tensor_type(METHODS["bf16"], "blk.0.attn_q.weight", (48, 48), 2, False) == "BF16"


def test_method_names():
    assert [m.name for m in resolve_methods(["Q8_0", "quantized", "f16", "q8_0"])] == ["q8_0", "q4_k_m", "f16"]
    with pytest.raises(PronghornError, match="unknown GGUF quantization method 'q3_xx'.*q4_k_m"):
        resolve_methods("q3_xx")
