"""The decode step replayed as a CUDA graph: the same logits and tokens as the same step run eagerly (GPU only)."""

import pytest
import torch
import transformers

from helpers import left_padded_batch, make_pair
from pronghorn.infer import generate
from pronghorn.infer.static_decode import DecodeRunner, release
from pronghorn.models.lora import LoRAConfig, attach_lora, set_lora_enabled

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _batch(lengths, seed=0):
    return tuple(t.cuda() for t in left_padded_batch(lengths, seed=seed))


def _cuda_pair(name, dtype=torch.float32):
    hf, ours = make_pair(name, dtype=dtype)
    return hf.cuda(), ours.cuda()


@pytest.mark.parametrize("name", ["llama3_gqa_rope_scaling", "mistral_sliding", "qwen3_qknorm", "smollm2_tied",
                                  "gemma2", "gemma3_text", "phi3_partial_sliding"])
def test_graph_step_logits_equal_the_eager_static_step(name):
    _, ours = _cuda_pair(name)
    ids, mask = _batch([12, 7, 3], seed=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():  # as generate() runs them
        runners = {g: DecodeRunner(ours, 3, 128, use_graph=g) for g in (False, True)}
        logits = {g: r.prefill(ours, ids, mask, positions, padded=True).clone() for g, r in runners.items()}
        torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=0)
        for _ in range(10):
            next_ids = logits[False].argmax(-1)
            logits = {g: r.step(ours, next_ids).clone() for g, r in runners.items()}
            torch.testing.assert_close(logits[True], logits[False], rtol=1e-6, atol=1e-6)
    assert runners[True].graph is not None


@pytest.mark.parametrize("name", ["llama3_gqa_rope_scaling", "mistral_sliding", "qwen2_sliding", "smollm2_tied",
                                  "mistral_nemo_headdim", "gemma", "gemma2", "gemma3_text", "phi3_partial_sliding"])
def test_graph_greedy_equals_eager_and_transformers(name):
    hf, ours = _cuda_pair(name)
    ids, mask = _batch([12, 7, 3], seed=2)
    kw = dict(max_new_tokens=20, eos_token_id=96, pad_token_id=0)
    graph = generate(ours, ids, mask, decode_mode="graph", **kw)
    assert torch.equal(graph, generate(ours, ids, mask, decode_mode="eager", **kw))
    assert torch.equal(graph, hf.generate(ids, attention_mask=mask, do_sample=False, **kw))
    assert torch.equal(graph, generate(ours, ids, mask, **kw))  # "auto" picks the graph on CUDA; reused


def test_graph_follows_adapter_switches_and_in_place_updates():
    _, ours = _cuda_pair("llama3_gqa_rope_scaling")
    attach_lora(ours, LoRAConfig(r=4))
    ids, mask = _batch([9, 5], seed=3)
    kw = dict(max_new_tokens=12, eos_token_id=[])
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    adapted = generate(ours, ids, mask, decode_mode="graph", **kw)
    assert torch.equal(adapted, generate(ours, ids, mask, decode_mode="static", **kw))
    set_lora_enabled(ours, False)
    base = generate(ours, ids, mask, decode_mode="graph", **kw)
    assert not torch.equal(base, adapted)
    assert torch.equal(base, generate(ours, ids, mask, decode_mode="static", **kw))
    set_lora_enabled(ours, True)
    with torch.no_grad():  # an optimizer step: same storage, new values; the captured graph reads them
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.mul_(-1.0)
    assert torch.equal(generate(ours, ids, mask, decode_mode="graph", **kw),
                       generate(ours, ids, mask, decode_mode="static", **kw))
    release(ours)


def test_graph_keeps_the_adapters_operands_and_follows_updates_that_bump_no_version():
    """A bf16 model with fp32 adapters (GRPO's setting): the graph reads the adapters' bf16 operands made in each
    call's prefill (kernels/adapter_operands.GraphOperands), so the same runner follows an update written
    through ``.data`` (no version bump, as an 8-bit optimizer's kernel writes) and equals the eager steps."""
    from pronghorn.infer.static_decode import get_runner

    _, ours = _cuda_pair("llama3_gqa_rope_scaling", dtype=torch.bfloat16)
    attach_lora(ours, LoRAConfig(r=4))
    adapters = [p for n, p in ours.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    ids, mask = _batch([9, 5], seed=4)
    kw = dict(max_new_tokens=12, eos_token_id=[])
    with torch.no_grad():
        for p in adapters:
            p.normal_(0, 0.3)
    flip = [p for p in adapters if p.shape[0] != 4]  # every lora_B ([out, r])

    def flipped():
        for p in flip:
            p.data.mul_(-1.0)

    first = generate(ours, ids, mask, decode_mode="graph", **kw)
    runner = get_runner(ours, 2, ids.shape[1] + 12, True)  # one runner per model: this call's
    assert runner.graph is not None and len(runner.operands) > 0
    flipped()
    second = generate(ours, ids, mask, decode_mode="graph", **kw)
    assert get_runner(ours, 2, ids.shape[1] + 12, True) is runner  # the same graph, replayed
    assert not torch.equal(second, first)
    assert torch.equal(second, generate(ours, ids, mask, decode_mode="static", **kw))  # (a runner of its own)
    flipped()
    assert torch.equal(first, generate(ours, ids, mask, decode_mode="static", **kw))
    release(ours)


def test_graph_sampling_stops_and_streamers_in_bf16():
    _, ours = _cuda_pair("qwen3_qknorm", dtype=torch.bfloat16)
    ids, mask = _batch([8, 4, 6], seed=4)
    kw = dict(max_new_tokens=24, do_sample=True, temperature=0.8, top_p=0.9, top_k=40, min_p=0.05, eos_token_id=[])
    a = generate(ours, ids, mask, seed=5, decode_mode="graph", **kw)
    assert torch.equal(a, generate(ours, ids, mask, seed=5, decode_mode="graph", **kw))
    assert torch.equal(a, generate(ours, ids, mask, seed=5, decode_mode="static", **kw))
    L = ids.shape[1]
    eos = int(a[1, L + 3])
    kw.update(eos_token_id=eos, pad_token_id=1)
    assert torch.equal(generate(ours, ids, mask, seed=5, decode_mode="graph", **kw),
                       generate(ours, ids, mask, seed=5, decode_mode="static", **kw))

    class Tok:
        def decode(self, ids, **kwargs):
            return "".join(f"<{int(i)}>" for i in ids)

    streamer = transformers.TextIteratorStreamer(Tok(), skip_prompt=True)
    out = generate(ours, ids[:1], max_new_tokens=9, eos_token_id=[], streamer=streamer, decode_mode="graph")
    assert "".join(streamer) == Tok().decode(out[0, L:].tolist())


def test_real_smollm2_chat_batch_graph_equals_transformers(smollm2_dir):
    from pronghorn.api import FastLanguageModel

    ours, tok = FastLanguageModel.from_pretrained(str(smollm2_dir), dtype=torch.float32, device="cuda")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32,
                                                           attn_implementation="sdpa").cuda().eval()
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in ["What is the capital of France?", "Name three colours.", "Hi"]]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
    kw = dict(max_new_tokens=40, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    graph = ours.generate(**enc, decode_mode="graph", **kw)
    assert torch.equal(graph, hf.generate(**enc, do_sample=False, **kw))
    assert torch.equal(graph, ours.generate(**enc, decode_mode="eager", **kw))
