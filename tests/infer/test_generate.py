"""generate() against transformers' generate(), against itself without the KV cache, and its stopping rules."""

import pytest
import torch
import transformers

from helpers import left_padded_batch as _batch
from helpers import make_pair, randomize_lora_b
from pronghorn.infer import generate
from pronghorn.models.lora import LoRAConfig, attach_lora, merge_lora

NEVER = 96  # an EOS id for runs that should not stop early (if hit, transformers must stop identically)


class AngleTokenizer:
    """Decodes id i as "<i>": multi-character tokens, so a stop string can end inside a token."""

    pad_token_id = None
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False, **kwargs):
        return "".join(f"<{int(i)}>" for i in ids)


def _expected_after_stops(full, prompt_len, stop_at, pad):
    """Cut ``full`` (a run without stopping) as generate() should: row b keeps its new tokens up to index
    stop_at[b] (None: never stops) and is padded after; the output ends when every row has stopped."""
    rows = []
    for b, j in enumerate(stop_at):
        row = full[b].clone()
        if j is not None:
            row[prompt_len + j + 1:] = pad
        rows.append(row)
    out = torch.stack(rows)
    if all(j is not None for j in stop_at):
        out = out[:, : prompt_len + max(stop_at) + 1]
    return out


@pytest.mark.parametrize("name", ["llama3_gqa_rope_scaling", "mistral_sliding", "qwen3_qknorm", "smollm2_tied"])
def test_greedy_matches_transformers(name):
    hf, ours = make_pair(name)
    # batch of one, longer than mistral_sliding's window (5)
    ids, _ = _batch([11], seed=1)
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                      pad_token_id=0, eos_token_id=NEVER)
    assert torch.equal(generate(ours, ids, max_new_tokens=12, eos_token_id=NEVER, pad_token_id=0), ref)
    # left-padded batch of three prompt lengths
    ids, mask = _batch([12, 7, 3], seed=2)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                      eos_token_id=NEVER)
    out = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=NEVER, pad_token_id=0)
    assert torch.equal(out, ref)


def test_left_padded_rows_equal_rows_run_alone():
    _, ours = make_pair("llama3_gqa_rope_scaling")
    ids, mask = _batch([10, 6, 2], seed=3)
    out = generate(ours, ids, mask, max_new_tokens=8, eos_token_id=[])
    for b in range(3):
        alone = generate(ours, ids[b : b + 1, mask[b].bool()], max_new_tokens=8, eos_token_id=[])
        assert torch.equal(out[b, -8:], alone[0, -8:])


@pytest.mark.parametrize("name", ["llama3_gqa_rope_scaling", "mistral_sliding", "qwen3_qknorm"])
def test_kv_cache_logits_equal_full_forward_each_step(name):
    _, ours = make_pair(name)
    ids, mask = _batch([9, 4, 6], seed=4)
    seen = {True: [], False: []}
    use = [True]
    hook = ours.register_forward_hook(lambda m, a, kw, out: seen[use[0]].append(out.logits[:, -1].clone()),
                                      with_kwargs=True)
    try:
        cached = generate(ours, ids, mask, max_new_tokens=10, eos_token_id=[], use_cache=True)
        use[0] = False
        full = generate(ours, ids, mask, max_new_tokens=10, eos_token_id=[], use_cache=False)
    finally:
        hook.remove()
    assert torch.equal(cached, full)
    assert len(seen[True]) == len(seen[False]) == 10
    real = torch.ones(3, dtype=torch.bool)
    for a, b in zip(seen[True], seen[False]):
        torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)


def test_sampling_matches_transformers_with_the_same_rng():
    hf, ours = make_pair("llama3_gqa_rope_scaling")
    ids, mask = _batch([8, 5, 3], seed=5)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05,
              repetition_penalty=1.3, pad_token_id=0, eos_token_id=NEVER)
    torch.manual_seed(11)
    ref = hf.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(11)
    assert torch.equal(generate(ours, ids, mask, **kw), ref)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    _, ours = make_pair("qwen3_qknorm")
    ids, mask = _batch([7, 4], seed=6)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, eos_token_id=[])
    a = generate(ours, ids, mask, seed=1, **kw)
    assert torch.equal(a, generate(ours, ids, mask, seed=1, **kw))
    assert not torch.equal(a, generate(ours, ids, mask, seed=2, **kw))
    greedy = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(generate(ours, ids, mask, seed=3, top_k=1, **kw), greedy)
    assert torch.equal(generate(ours, ids, mask, do_sample=True, temperature=0.0, max_new_tokens=12,
                                eos_token_id=[]), greedy)


def test_eos_stops_and_pads_like_transformers():
    hf, ours = make_pair("smollm2_tied")
    ids, mask = _batch([6, 6, 3], seed=7)
    L = ids.shape[1]
    full = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=[])
    eos = int(full[0, L + 3])  # row 0 stops at its 4th new token
    stop_at = [next((j for j, t in enumerate(full[b, L:].tolist()) if t == eos), None) for b in range(3)]
    out = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(out, _expected_after_stops(full, L, stop_at, pad=1))
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(out, ref)
    # a list of EOS ids: every row stops at its first one; pad defaults to the first EOS id
    eos_ids = sorted({int(full[b, L + 1]) for b in range(3)})
    out = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=eos_ids)
    stop_at = [next(j for j, t in enumerate(full[b, L:].tolist()) if t in eos_ids) for b in range(3)]
    assert torch.equal(out, _expected_after_stops(full, L, stop_at, pad=eos_ids[0]))
    assert out.shape[1] <= L + 2


def test_stop_strings_stop_a_row_even_inside_a_token():
    _, ours = make_pair("qwen3_qknorm")
    tok = AngleTokenizer()
    ids, mask = _batch([5, 8], seed=8)
    L = ids.shape[1]
    full = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=[])
    cont = full[0, L:].tolist()
    stop = f"{cont[3]}><{cont[4]}"  # ends inside the 5th new token's text "<id>"

    def first_hit(row):
        return next((j for j in range(len(row)) if stop in tok.decode(row[: j + 1])), None)

    stop_at = [first_hit(full[b, L:].tolist()) for b in range(2)]
    assert stop_at[0] is not None and stop_at[0] <= 4
    out = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=[], pad_token_id=2, stop_strings=[stop, "zz"],
                   tokenizer=tok)
    assert torch.equal(out, _expected_after_stops(full, L, stop_at, pad=2))
    with pytest.raises(ValueError, match="tokenizer"):
        generate(ours, ids, mask, max_new_tokens=2, stop_strings=stop)


class RecordingStreamer:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", value.clone()))

    def end(self):
        self.calls.append(("end", None))


def test_streamer_gets_the_prompt_then_each_token():
    _, ours = make_pair("llama3_gqa_rope_scaling")
    ids, _ = _batch([6], seed=9)
    rec = RecordingStreamer()
    out = generate(ours, ids, max_new_tokens=5, eos_token_id=[], streamer=rec)
    assert [c[0] for c in rec.calls] == ["put"] * 6 + ["end"]
    assert torch.equal(rec.calls[0][1], ids)
    assert torch.equal(torch.cat([c[1] for c in rec.calls[1:6]]), out[0, 6:])
    # transformers' own streamers work too
    it = transformers.TextIteratorStreamer(AngleTokenizer(), skip_prompt=True)
    generate(ours, ids, max_new_tokens=5, eos_token_id=[], streamer=it)
    assert "".join(it) == AngleTokenizer().decode(out[0, 6:].tolist())
    with pytest.raises(ValueError, match="batch"):
        generate(ours, _batch([3, 3])[0], max_new_tokens=2, streamer=RecordingStreamer())


def test_right_padding_raises():
    _, ours = make_pair("smollm2_tied")
    ids, _ = _batch([5, 5], seed=10)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    with pytest.raises(ValueError, match="left"):
        generate(ours, ids, mask, max_new_tokens=2)


def test_lora_model_generates_like_its_merged_copy():
    _, ours = make_pair("llama3_gqa_rope_scaling")
    attach_lora(ours, LoRAConfig(r=4))
    randomize_lora_b(ours)
    ids, mask = _batch([8, 5], seed=11)
    ours.train()  # generate() must switch to eval and back
    with_adapter = generate(ours, ids, mask, max_new_tokens=10, eos_token_id=[])
    assert ours.training and all(m.training for m in ours.modules())
    assert not with_adapter.is_inference()  # usable outside inference mode (e.g. edited in place)
    base = generate(make_pair("llama3_gqa_rope_scaling")[1], ids, mask, max_new_tokens=10, eos_token_id=[])
    assert not torch.equal(with_adapter, base)  # the adapter matters
    merged = generate(merge_lora(ours), ids, mask, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(with_adapter, merged)


def test_default_eos_from_config_and_unsupported_hf_arguments():
    _, ours = make_pair("smollm2_tied")
    ids, _ = _batch([4], seed=12)
    full = generate(ours, ids, max_new_tokens=6, eos_token_id=[])
    eos = int(full[0, 4 + 1])
    ours.config.eos_token_id = eos
    first = full[0, 4:].tolist().index(eos)
    assert torch.equal(generate(ours, ids, max_new_tokens=6, output_attentions=False), full[:, : 4 + first + 1])
    with pytest.raises(ValueError, match="num_beams"):
        generate(ours, ids, max_new_tokens=2, num_beams=4)
