"""Optional (``make test-llamacpp``): llama.cpp itself runs our GGUF files of the Gemma, Gemma 2, Gemma 3 and
Phi-3 families (issue 16).

Skipped unless ``llama_cpp`` (llama-cpp-python, built from source) imports. Each tiny model of tests/helpers.py
(random weights, a random LoRA adapter merged at export) is saved as an F32 GGUF file in its llama.cpp
architecture; llama.cpp evaluates a token sequence (fp32 weights, an fp32 KV cache) and its logits at every
position must equal pronghorn's on the same tokens, relative to the largest logit: Phi-3 within 1e-5 (measured
5e-7: fp32 throughout, sums ordered otherwise); the Gemma families within 1e-3 (measured 2.5e-4), because
llama.cpp's CPU GELU reads an fp16 lookup table (GGML_GELU_FP16), about 1e-3 relative on each activation of
GeGLU. That covers the (1 + w) norms, the embedding scale, GeGLU, the sandwich norms, both soft-caps, sliding
windows, Gemma 3's q/k norms, layer pattern and RoPE bases, and Phi-3's fused tensors and LongRoPE factors as
llama.cpp reads them from the metadata.
"""

import pytest
import torch

from helpers import make_pair, randomize_lora_b
from pronghorn.export.gguf_writer import save_gguf
from pronghorn.models.lora import LoRAConfig, attach_lora

llama_cpp = pytest.importorskip("llama_cpp")

# (tests/helpers.py case, its llama.cpp architecture, tolerance); the *_gguf cases have the head sizes
# llama.cpp assumes; GeGLU families: llama.cpp's fp16 GELU table (see above)
FAMILIES = [("gemma", "gemma", 1e-3), ("gemma2_gguf", "gemma2", 1e-3), ("gemma3_text_gguf", "gemma3", 1e-3),
            ("phi3_gguf", "phi3", 1e-5), ("phi3_longrope", "phi3", 1e-5)]


def _llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)  # an fp32 KV cache
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)], dtype=torch.float64)


@pytest.mark.parametrize("case, arch, tolerance", FAMILIES)
def test_llama_cpp_logits_equal_ours(case, arch, tolerance, tmp_path, tiny_tokenizer):
    from gguf import GGUFReader

    from pronghorn.models.gguf_loading import gguf_field

    _, model = make_pair(case)
    attach_lora(model, LoRAConfig(r=2, lora_alpha=4), seed=0)
    randomize_lora_b(model, scale=0.1)
    model.eval()
    save_gguf(model, tmp_path / "g", tiny_tokenizer, "f32")
    path = tmp_path / "g" / "model.F32.gguf"
    assert gguf_field(GGUFReader(path), "general.architecture") == arch
    ids = torch.randint(3, 97, (1, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours = model(input_ids=ids).logits[0].double()
    theirs = _llama_cpp_logits(path, ids[0].tolist())
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() <= tolerance * ours.abs().max()
