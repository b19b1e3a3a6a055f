"""Groups of rows with one prompt hold its keys and values once (pronghorn/models/shared_prefix_cache.py): decoding
from a SharedPrefixCache gives what a StaticKVCache gives, token for token, on tiny configs of several families
(GQA, sliding windows, q/k norms), padded prompts, greedy and seeded sampling; the prefill runs each prompt once."""

import pytest
import torch

from helpers import left_padded_batch as _batch
from helpers import make_pair
import importlib

from pronghorn.infer import generate
from pronghorn.infer import static_decode
from pronghorn.models.shared_prefix_cache import SharedPrefixCache, shared_rows

gen_module = importlib.import_module("pronghorn.infer.generate")  # the module, not the function of that name
NEVER = 96


def _repeat(t, g):
    return t.repeat_interleave(g, 0)


def test_shared_rows_finds_groups_of_equal_prompts():
    ids, mask = _batch([6, 4, 3], seed=1)
    assert shared_rows(ids, mask) == 1
    assert shared_rows(_repeat(ids, 4), _repeat(mask, 4)) == 4
    assert shared_rows(ids[:1], mask[:1]) == 1
    mixed = _repeat(ids, 2)
    mixed[3] = mixed[0]  # runs of 2, 1, ... do not make groups
    assert shared_rows(mixed, _repeat(mask, 2)) == 1
    same = ids[:1].expand(6, -1).clone()
    assert shared_rows(same, mask[:1].expand(6, -1)) == 6


def test_the_cache_hands_attention_the_static_caches_keys_and_values():
    torch.manual_seed(0)
    layers, groups, share, heads, dim, prompt, slots = 2, 3, 2, 2, 4, 5, 9
    cache = SharedPrefixCache(layers, groups * share, share, heads, dim, prompt, slots, torch.float32, "cpu")
    whole = static_decode.StaticKVCache(layers, groups * share, heads, dim, slots, torch.float32, "cpu")
    for layer in range(layers):
        k, v = torch.randn(groups, heads, prompt, dim), torch.randn(groups, heads, prompt, dim)
        cache.rows(0, groups * share).update(layer, k, v)
        whole.update(layer, _repeat(k, share), _repeat(v, share))
    cache.length = whole.length = prompt
    mask = torch.ones(groups * share, prompt, dtype=torch.long)
    mask[:share, :2] = 0
    cache.start_decoding(mask)
    whole.start_decoding(mask)
    for _ in range(slots - prompt):
        for layer in range(layers):
            k, v = torch.randn(groups * share, heads, 1, dim), torch.randn(groups * share, heads, 1, dim)
            a, b = cache.update(layer, k, v), whole.update(layer, k, v)
            written = int(cache.index) + 1
            assert torch.equal(a[0][:, :, :written], b[0][:, :, :written])
            assert torch.equal(a[1][:, :, :written], b[1][:, :, :written])
        masks = cache.decode_masks({None, 3}, torch.float32), whole.decode_masks({None, 3}, torch.float32)
        assert all(torch.equal(masks[0][w], masks[1][w]) for w in (None, 3))
        cache.advance(1)
        whole.advance(1)
    with pytest.raises(ValueError, match="whole groups"):
        cache.rows(1, 4)


@pytest.mark.parametrize("name", ["llama3_gqa_rope_scaling", "mistral_sliding", "qwen3_qknorm", "gemma2",
                                  "gemma3_text", "phi3_partial_sliding"])
@pytest.mark.parametrize("sample", [False, True])
def test_decoding_repeated_prompts_equals_the_static_cache(name, sample, monkeypatch):
    _, ours = make_pair(name)
    ids, mask = _batch([12, 7, 3], seed=4)  # longer than the sliding windows
    ids, mask = _repeat(ids, 3), _repeat(mask, 3)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=NEVER, pad_token_id=0,
              decode_mode="static", do_sample=sample, temperature=1.5)
    prefills = []
    hook = ours.register_forward_hook(lambda m, a, k, out: prefills.append(out.logits.shape[0]), with_kwargs=True)
    try:
        shared = generate(ours, seed=3, **kw)
    finally:
        hook.remove()
    runner = static_decode._RUNNERS[ours]
    assert isinstance(runner.cache, SharedPrefixCache) and runner.cache.keys[0].shape[0] == 3
    assert prefills[0] == 3  # one prefill row a prompt
    static_decode.release(ours)
    monkeypatch.setattr(gen_module, "shared_rows", lambda *a: 1)
    plain = generate(ours, seed=3, **kw)
    assert not isinstance(static_decode._RUNNERS[ours].cache, SharedPrefixCache)
    assert torch.equal(shared, plain)
    assert torch.equal(plain, generate(ours, seed=3, **{**kw, "decode_mode": "eager"}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decoding_of_repeated_prompts_equals_the_static_caches_graph(dtype, monkeypatch):
    """On the GPU, the graph replays the shared cache's copies: in fp32 the same tokens as the static cache's graph
    (greedy and seeded sampling), with LoRA adapters on. In bf16 the prefill of 3 rows and of 12 may round apart
    (cuBLAS picks kernels by shape), so there the first token of every row is compared and the rest must run."""
    from pronghorn.models.lora import LoRAConfig, attach_lora

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    _, ours = make_pair("llama3_gqa_rope_scaling", dtype=dtype)
    ours = ours.cuda()
    attach_lora(ours, LoRAConfig(r=4))
    ids, mask = (_repeat(t, 4).cuda() for t in _batch([12, 7, 3], seed=4))
    for sample in (False, True):
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, eos_token_id=NEVER, pad_token_id=0,
                  decode_mode="graph", do_sample=sample, seed=5)
        with monkeypatch.context() as m:
            shared = generate(ours, **kw)
            runner = static_decode._RUNNERS[ours]
            assert isinstance(runner.cache, SharedPrefixCache) and runner.graph is not None
            static_decode.release(ours)
            m.setattr(gen_module, "shared_rows", lambda *a: 1)
            plain = generate(ours, **kw)
            static_decode.release(ours)
        if dtype == torch.float32:
            assert torch.equal(shared, plain)
        else:
            assert shared.shape == plain.shape and torch.equal(shared[:, ids.shape[1]], plain[:, ids.shape[1]])
