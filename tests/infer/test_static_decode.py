"""The static-cache decode loop (sync-free, shape-static steps; what the CUDA graph replays) against the eager
loop and transformers' generate, on tiny configs of every family."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import left_padded_batch as _batch
from helpers import make_pair, randomize_lora_b
from pronghorn.infer import generate
from pronghorn.infer.static_decode import CACHE_LEN_MULTIPLE, get_runner, graphs_supported
from pronghorn.models.lora import LoRAConfig, attach_lora, merge_lora

NEVER = 96  # an EOS id no run here should reach (if one does, transformers must stop identically)
FAMILIES = ["llama3_gqa_rope_scaling", "llama_dynamic_rope", "mistral_sliding", "qwen2_sliding", "qwen3_qknorm",
            "smollm2_tied", "mistral_nemo_headdim", "gemma", "gemma2", "gemma3_text", "phi3_partial_sliding"]
HOST_READING = ["llama_dynamic_rope", "phi3_longrope"]  # read the largest position each step: decoded eagerly


def _step_logits(model, **kw):
    """generate()'s output and the last-position logits of every forward it ran."""
    seen = []
    hook = model.register_forward_hook(lambda m, a, k, out: seen.append(out.logits[:, -1].clone()), with_kwargs=True)
    try:
        out = generate(model, **kw)
    finally:
        hook.remove()
    return out, seen


@pytest.mark.parametrize("name", FAMILIES)
def test_static_greedy_equals_eager_and_transformers_logits_tight(name):
    hf, ours = make_pair(name)
    ids, mask = _batch([12, 7, 3], seed=2)  # longer than the sliding windows (5, 4)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=NEVER, pad_token_id=0)
    eager, eager_logits = _step_logits(ours, decode_mode="eager", **kw)
    static, static_logits = _step_logits(ours, decode_mode="static", **kw)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=NEVER)
    assert torch.equal(eager, ref) and torch.equal(static, ref)
    assert len(static_logits) == len(eager_logits) == 12
    for a, b in zip(static_logits, eager_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama3_gqa_rope_scaling", "mistral_sliding", "qwen3_qknorm"])
def test_prompt_filled_a_group_of_rows_at_a_time_decodes_the_same(name, monkeypatch):
    """The prompt in groups of rows (``PREFILL_TOKENS``: here 2 rows of 12 tokens a forward, then 1) writes the
    same cache and last logits as one forward over all rows: greedy tokens equal transformers', logits tight."""
    import pronghorn.infer.static_decode as static_decode

    hf, ours = make_pair(name)
    ids, mask = _batch([12, 7, 3], seed=5)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=NEVER, pad_token_id=0)
    whole, whole_logits = _step_logits(ours, decode_mode="static", **kw)
    monkeypatch.setattr(static_decode, "PREFILL_TOKENS", 24)
    grouped, grouped_logits = _step_logits(ours, decode_mode="static", **kw)
    assert len(grouped_logits) == len(whole_logits) + 1  # the prompt took two forwards
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=NEVER)
    assert torch.equal(grouped, ref) and torch.equal(whole, ref)
    torch.testing.assert_close(torch.cat(grouped_logits[:2]), whole_logits[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grouped_logits[2:], whole_logits[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_runner_is_reused_across_calls_and_rebuilt_when_it_must():
    _, ours = make_pair("llama3_gqa_rope_scaling")
    first = get_runner(ours, 2, 20, use_graph=False)
    assert first.cache.max_len == CACHE_LEN_MULTIPLE
    assert get_runner(ours, 2, 40, use_graph=False) is first  # same batch, same rounded length
    # a second call reuses the cache left by the first: stale slots must stay invisible
    ids, mask = _batch([9, 4], seed=3)
    long_ids, long_mask = _batch([14, 11], seed=4)
    generate(ours, long_ids, long_mask, max_new_tokens=20, eos_token_id=[], decode_mode="static")
    again = generate(ours, ids, mask, max_new_tokens=10, eos_token_id=[], decode_mode="static")
    assert torch.equal(again, generate(ours, ids, mask, max_new_tokens=10, eos_token_id=[], decode_mode="eager"))
    attach_lora(ours, LoRAConfig(r=4))  # new parameters: a new runner
    assert get_runner(ours, 2, 20, use_graph=False) is not first
    assert get_runner(ours, 3, 20, use_graph=False).cache.keys[0].shape[0] == 3


def test_a_new_runner_is_allocated_after_the_old_one_is_freed(monkeypatch):
    """A runner for another batch size replaces the model's: the old one (its KV cache, its graph's pool) is freed
    before the new cache is allocated, so the two never coexist (GRPO's rounds of different sizes under a budget
    ran out of memory on the H200 holding both)."""
    import gc
    import weakref

    import pronghorn.infer.static_decode as static_decode

    _, ours = make_pair("llama3_gqa_rope_scaling")
    old = weakref.ref(get_runner(ours, 2, 20, use_graph=False))
    alive_at_allocation = []
    real = static_decode.StaticKVCache

    def cache(*a, **k):
        gc.disable()  # only reference counting may free it, as on the GPU's hot path
        try:
            alive_at_allocation.append(old() is not None)
        finally:
            gc.enable()
        return real(*a, **k)

    monkeypatch.setattr(static_decode, "StaticKVCache", cache)
    new = get_runner(ours, 3, 20, use_graph=False)
    assert alive_at_allocation == [False] and new.cache.keys[0].shape[0] == 3


def test_a_smaller_cache_multiple_sizes_the_cache_closer_and_decodes_the_same():
    """``cache_multiple`` (GRPO's rollout passes 16): the static cache is rounded up to it, not to 128; the tokens
    are the same; a bad value is a clear error."""
    from pronghorn.infer.static_decode import _RUNNERS

    _, ours = make_pair("llama3_gqa_rope_scaling")
    ids, mask = _batch([12, 7], seed=6)
    kw = dict(max_new_tokens=9, eos_token_id=NEVER, pad_token_id=0, decode_mode="static")
    default = generate(ours, ids, mask, **kw)
    assert _RUNNERS[ours].cache.max_len == CACHE_LEN_MULTIPLE
    close = generate(ours, ids, mask, cache_multiple=16, **kw)
    assert _RUNNERS[ours].cache.max_len == 32 and torch.equal(close, default)  # 12 + 9 tokens -> 32
    with pytest.raises(ValueError, match="cache_multiple must be a positive int"):
        generate(ours, ids, mask, cache_multiple=0, **kw)


def test_lora_unmerged_static_equals_merged():
    _, ours = make_pair("qwen3_qknorm")
    attach_lora(ours, LoRAConfig(r=4))
    randomize_lora_b(ours)
    ids, mask = _batch([8, 5], seed=5)
    kw = dict(max_new_tokens=10, eos_token_id=[], decode_mode="static")
    with_adapter = generate(ours, ids, mask, **kw)
    assert torch.equal(with_adapter, generate(merge_lora(ours), ids, mask, **kw))


def test_seeded_sampling_is_reproducible_and_equals_eager():
    _, ours = make_pair("llama3_gqa_rope_scaling")
    ids, mask = _batch([8, 5, 3], seed=6)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=30, top_p=0.95, min_p=0.02,
              repetition_penalty=1.2, eos_token_id=[])
    a = generate(ours, ids, mask, seed=7, decode_mode="static", **kw)
    assert torch.equal(a, generate(ours, ids, mask, seed=7, decode_mode="static", **kw))
    assert torch.equal(a, generate(ours, ids, mask, seed=7, decode_mode="eager", **kw))
    assert not torch.equal(a, generate(ours, ids, mask, seed=8, decode_mode="static", **kw))
    torch.manual_seed(3)  # unseeded: torch's global RNG, drawn exactly as the eager loop draws it
    b = generate(ours, ids, mask, decode_mode="static", **kw)
    torch.manual_seed(3)
    assert torch.equal(b, generate(ours, ids, mask, decode_mode="eager", **kw))


@pytest.mark.parametrize("max_new_tokens", [1, 5, 40])  # stops before, at and after the first host check
def test_eos_stopping_is_the_eager_loops(max_new_tokens):
    _, ours = make_pair("smollm2_tied")
    ids, mask = _batch([6, 6, 3], seed=7)
    L = ids.shape[1]
    full = generate(ours, ids, mask, max_new_tokens=40, eos_token_id=[], decode_mode="eager")
    for eos in {int(full[0, L + 2]), int(full[1, L + 20]), NEVER}:
        kw = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=1)
        eager = generate(ours, ids, mask, decode_mode="eager", **kw)
        assert torch.equal(generate(ours, ids, mask, decode_mode="static", **kw), eager)


class AngleTokenizer:
    pad_token_id = eos_token_id = None

    def decode(self, ids, skip_special_tokens=False, **kwargs):
        return "".join(f"<{int(i)}>" for i in ids)


class RecordingStreamer:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.clone())

    def end(self):
        self.calls.append(None)


def test_stop_strings_and_streamer_are_the_eager_loops():
    _, ours = make_pair("qwen3_qknorm")
    ids, mask = _batch([5, 8], seed=8)
    L = ids.shape[1]
    full = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=[], decode_mode="eager")
    stop = f"{int(full[0, L + 3])}><{int(full[0, L + 4])}"
    kw = dict(max_new_tokens=12, eos_token_id=[], pad_token_id=2, stop_strings=[stop], tokenizer=AngleTokenizer())
    assert torch.equal(generate(ours, ids, mask, decode_mode="static", **kw),
                       generate(ours, ids, mask, decode_mode="eager", **kw))
    records = {}
    for mode in ("eager", "static"):
        rec = RecordingStreamer()
        generate(ours, ids[:1], max_new_tokens=6, eos_token_id=[], streamer=rec, decode_mode=mode)
        records[mode] = rec.calls
    assert len(records["static"]) == 1 + 6 + 1 and records["static"][-1] is None
    assert all(torch.equal(a, b) for a, b in zip(records["static"][:-1], records["eager"][:-1]))


def test_decode_mode_arguments():
    _, ours = make_pair("smollm2_tied")
    ids, _ = _batch([4])
    with pytest.raises(ValueError, match="decode_mode"):
        generate(ours, ids, max_new_tokens=2, decode_mode="fast")
    with pytest.raises(ValueError, match="use_cache"):
        generate(ours, ids, max_new_tokens=2, decode_mode="static", use_cache=False)
    with pytest.raises(ValueError, match="CUDA"):  # a CPU model
        generate(ours, ids, max_new_tokens=2, decode_mode="graph")
    assert generate(ours, ids, max_new_tokens=0, decode_mode="static").shape == ids.shape


class HostReads(TorchDispatchMode):
    """Records ops that read tensor values on the host (a device sync on a GPU; illegal in a CUDA graph) or
    whose output shape depends on tensor values."""

    WATCHED = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
               torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.WATCHED:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", FAMILIES + ["phi3_longrope"])
def test_decode_step_reads_nothing_on_the_host(name):
    """What a CUDA graph needs of the step, checked on the CPU; dynamic NTK and LongRoPE are the known exceptions
    (they read the largest position), so graphs_supported() keeps them on the eager loop."""
    _, ours = make_pair(name)
    ids, mask = _batch([7, 3], seed=9)
    attach_lora(ours, LoRAConfig(r=2))  # adapters unmerged are part of the step
    with torch.inference_mode():
        runner = get_runner(ours, 2, 16, use_graph=False)
        logits = runner.prefill(ours, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), padded=True)
        with HostReads() as reads:
            for _ in range(3):
                logits = runner.step(ours, logits.argmax(-1))
    assert bool(reads.seen) == (name in HOST_READING), reads.seen
    assert ours.config.rope["rope_type"] not in ("dynamic", "longrope") or not graphs_supported(ours.to("cpu"))


def test_longrope_decodes_eagerly_under_auto_and_refuses_static_clearly():
    """Phi-3's LongRoPE switches its factors once the sequence passes the original context: "auto" takes the eager
    loop (equal to transformers across the switch), "static" says why it cannot."""
    hf, ours = make_pair("phi3_longrope")
    ids, mask = _batch([12, 7, 3], seed=2)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=NEVER, pad_token_id=0)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=NEVER)
    assert torch.equal(generate(ours, **kw), ref)
    with pytest.raises(ValueError, match="LongRoPE"):
        generate(ours, decode_mode="static", **kw)
