"""Sampling functions against transformers' logits processors, applied in generate()'s order."""

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pronghorn.infer.sampling import (
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    draw,
    process_logits,
    sample_next,
)

V = 50


def _data(seed=0, b=4, length=12):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, V, generator=g) * 3
    ids = torch.randint(0, V, (b, length), generator=g)
    return logits, ids


def _hf_processors(do_sample, temperature, top_k, top_p, min_p, penalty, pad_lengths=None):
    """The list transformers' generate() builds for these settings (see GenerationMixin._get_logits_processor)."""
    procs = LogitsProcessorList()
    if penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=pad_lengths))
    if do_sample:
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k != 0:
            procs.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
        procs.append(MinPLogitsWarper(min_p))
    return procs


SETTINGS = [
    dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, penalty=1.0),
    dict(do_sample=True, temperature=0.7, top_k=10, top_p=0.9, min_p=0.0, penalty=1.3),
    dict(do_sample=True, temperature=1.5, top_k=0, top_p=0.5, min_p=0.1, penalty=1.0),
    dict(do_sample=True, temperature=0.3, top_k=3, top_p=1.0, min_p=0.2, penalty=0.8),
    dict(do_sample=True, temperature=1.0, top_k=100, top_p=0.0, min_p=0.0, penalty=1.0),  # top_p=0 keeps one
    dict(do_sample=False, temperature=0.5, top_k=5, top_p=0.5, min_p=0.5, penalty=1.2),  # greedy: penalty only
]


@pytest.mark.parametrize("s", SETTINGS)
def test_processed_scores_and_samples_match_transformers(s):
    logits, ids = _data()
    ref = _hf_processors(**s)(ids, logits.clone())
    ours = process_logits(logits.clone(), ids, do_sample=s["do_sample"], temperature=s["temperature"],
                          top_k=s["top_k"], top_p=s["top_p"], min_p=s["min_p"], repetition_penalty=s["penalty"])
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)

    kwargs = dict(do_sample=s["do_sample"], temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                  min_p=s["min_p"], repetition_penalty=s["penalty"])
    nxt = sample_next(logits.clone(), ids, generator=torch.Generator().manual_seed(5), **kwargs)
    if s["do_sample"]:
        expect = torch.multinomial(ref.softmax(-1), 1, generator=torch.Generator().manual_seed(5)).squeeze(1)
    else:
        expect = ref.argmax(-1)
    assert torch.equal(nxt, expect)


def test_repetition_penalty_ignores_left_padding_like_transformers():
    logits, ids = _data(1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[3, :7] = 0
    starts = (mask != 0).int().argmax(1).tolist()  # transformers 5.23 spells this prompt_ignore_length=starts;
    ref = torch.cat([RepetitionPenaltyLogitsProcessor(1.5)(ids[b:b + 1, s:], logits[b:b + 1].clone())  # per row
                     for b, s in enumerate(starts)])  # works on every transformers version
    assert torch.equal(apply_repetition_penalty(logits.clone(), ids, 1.5, mask), ref)
    # without a mask every listed token counts, prompt included
    full = apply_repetition_penalty(logits.clone(), ids, 1.5)
    assert torch.equal(full, RepetitionPenaltyLogitsProcessor(1.5)(ids, logits.clone()))
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, ids, True)
    assert torch.equal(full[~seen], logits[~seen])
    assert (full[seen] < logits[seen]).all()  # every seen token became less likely


def test_filters_keep_at_least_one_token():
    logits = torch.tensor([[0.0, 10.0, -3.0, 9.9]])
    assert torch.isfinite(apply_top_p(logits, 0.0)).sum() == 1
    assert torch.isfinite(apply_min_p(logits, 1.0)).sum() == 1
    assert torch.isfinite(apply_top_k(logits, 2)).tolist() == [[False, True, False, True]]
    assert torch.equal(apply_top_k(logits, 0), logits)


def test_greedy_paths():
    logits, ids = _data(2)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits), greedy)
    assert torch.equal(sample_next(logits, do_sample=True, temperature=0.0), greedy)
    assert torch.equal(sample_next(logits, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)


def test_seeded_sampling_is_reproducible():
    logits, _ = _data(3, b=8)
    draw = [sample_next(logits, do_sample=True, temperature=2.0, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(draw[0], draw[1])


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=1.5), dict(min_p=-0.1),
                                 dict(repetition_penalty=0.0)])
def test_bad_arguments_raise(bad):
    logits, _ = _data()
    with pytest.raises(ValueError, match=next(iter(bad))):
        sample_next(logits, do_sample=True, **bad)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA's exponential draws"))])
def test_draw_is_torch_multinomial_token_for_token(device):
    """``draw`` (no host syncs) picks what ``torch.multinomial(probs, 1)`` picks from the same generator state,
    on the CPU and on the GPU, for shapes of one row to a batch of a large vocabulary."""
    for shape in [(1, 7), (64, 1031), (5, 128256)]:
        probs = torch.softmax(torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3, -1).to(device)
        for seed in range(5):
            want = torch.multinomial(probs, 1, generator=torch.Generator(device).manual_seed(seed)).squeeze(1)
            assert torch.equal(draw(probs, torch.Generator(device).manual_seed(seed)), want)
