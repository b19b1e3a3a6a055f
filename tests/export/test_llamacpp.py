"""Optional (``make test-llamacpp``): llama.cpp itself runs our GGUF files.

Skipped unless ``llama_cpp`` (llama-cpp-python, built from source in about 10 minutes) imports. Checks that
llama.cpp tokenizes the chat prompt exactly as the Hugging Face tokenizer does, that its greedy completion of
the F16 and Q8_0 files equals pronghorn's greedy completion with the adapter (16 tokens or up to EOS), and
that the Q4_K_M file loads and completes to the same first token.
"""

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

PROMPT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def files(lora_smollm2, tmp_path_factory):
    model, tok = lora_smollm2
    out = tmp_path_factory.mktemp("llamacpp") / "gguf"
    model.save_pretrained_gguf(out, tok, quantization_method=["f16", "q8_0", "q4_k_m"])
    return out


@pytest.fixture(scope="module")
def reference(lora_smollm2):
    model, tok = lora_smollm2
    enc = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16)
    prompt = enc["input_ids"][0].tolist()
    return prompt, out[0, len(prompt):].tolist()


def _greedy(path, prompt_text, n=16):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
    ids = llm.tokenize(prompt_text.encode("utf-8"), add_bos=False, special=True)
    out = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(token)
        if token == llm.token_eos() or len(out) == n:
            break
    return ids, out


@pytest.mark.parametrize("name", ["model.F16.gguf", "model.Q8_0.gguf"])
def test_llama_cpp_greedy_completion_matches(files, reference, lora_smollm2, name):
    tok = lora_smollm2[1]
    prompt, want = reference
    text = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    ids, got = _greedy(files / name, text)
    assert ids == prompt
    assert got == want[: len(got)] and len(got) == len(want)


def test_llama_cpp_runs_q4_k_m(files, reference, lora_smollm2):
    tok = lora_smollm2[1]
    text = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    _, got = _greedy(files / "model.Q4_K_M.gguf", text, n=4)
    assert got[0] == reference[1][0]
