"""Padding-free packed batches: attention and labels never cross a sequence boundary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pronghorn.data.collate import pad_batch
from pronghorn.data.packing import collate_packed, pack_examples
from pronghorn.models.attention import build_attention_mask, sequence_ids
from pronghorn.models.kv_cache import KVCache
from pronghorn.models.lora import LoRAConfig, attach_lora
from tests.helpers import make_pair, random_examples

NAMES = ["llama3_gqa_rope_scaling", "mistral_sliding", "qwen3_qknorm", "mistral_nemo_headdim", "gemma", "gemma2",
         "gemma3_text", "phi3_partial_sliding"]
# LongRoPE picks its factors from the batch's largest position, as transformers does (a short sequence packed or
# padded beside a long one gets the long factors): packed equals padded, not each sequence alone
LONGROPE = ["phi3_longrope"]


def _token_losses(logits, labels):
    """Per-token next-token CE (0 where ignored), aligned with labels[1:]."""
    return F.cross_entropy(logits[:-1].double(), labels[1:], ignore_index=-100, reduction="none")


def _spans(position_ids):
    pos = position_ids.tolist()
    starts = [t for t in range(len(pos)) if t == 0 or pos[t] <= pos[t - 1]] + [len(pos)]
    return list(zip(starts, starts[1:]))


def test_sequence_ids_and_fast_path():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert sequence_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]]
    assert build_attention_mask(None, 6, 6, None, pos.device, pos[1:]) is None  # no restart: is_causal
    mask = build_attention_mask(None, 6, 6, None, pos.device, pos)
    assert mask.shape == (2, 1, 6, 6)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                         [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert torch.equal(mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    windowed = build_attention_mask(None, 6, 6, 2, pos.device, pos)
    assert windowed[0, 0, 2].int().tolist() == [0, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("name", NAMES)
def test_packed_losses_equal_alone(name):
    _, model = make_pair(name)
    examples = random_examples(n=10, seed=5)
    if name in ("mistral_sliding", "gemma2", "gemma3_text", "phi3_partial_sliding"):
        assert model.config.sliding_window < min(len(ex["input_ids"]) for ex in examples)
    rows = pack_examples(examples, max_length=48)
    assert len(rows) < len(examples)
    batch = collate_packed(rows, pad_token_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        alone = {}
        for ex in examples:
            out = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            alone[tuple(ex["input_ids"])] = _token_losses(out, torch.tensor(ex["labels"]))
    seen = 0
    for b, row in enumerate(rows):
        for s, e in _spans(torch.tensor(row["position_ids"])):
            ref = alone[tuple(row["input_ids"][s:e])]
            got = _token_losses(logits[b, s:e], batch["labels"][b, s:e])
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got.sum(), ref.sum(), rtol=1e-5, atol=0)
            seen += 1
    assert seen == len(examples)
    # the padding "sequence" at the end of shorter rows changes nothing either
    short = min(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    assert len(rows[short]["input_ids"]) < batch["input_ids"].shape[1]


@pytest.mark.parametrize("name", NAMES + LONGROPE)
def test_packed_lora_grads_equal_padded(name):
    grads = []
    examples = random_examples(n=8, seed=7)
    for packed in (True, False):
        _, model = make_pair(name, dtype=torch.float64)
        attach_lora(model, LoRAConfig(r=4, lora_alpha=8), seed=11)
        with torch.no_grad():  # B starts at zero; make it non-zero so A's gradients are tested too
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(generator=torch.Generator().manual_seed(len(n)))
        model.train()
        if packed:
            batch = collate_packed(pack_examples(examples, max_length=40), pad_token_id=0)
            assert "attention_mask" not in batch
        else:
            batch = pad_batch(examples, pad_token_id=0)
        loss = model(**batch).loss  # mean over the non-ignored targets: same count either way
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (lp, gp), (lr, gr) = grads
    torch.testing.assert_close(lp, lr, rtol=1e-12, atol=0)
    assert gp.keys() == gr.keys() and gp
    for n in gp:
        torch.testing.assert_close(gp[n], gr[n], rtol=1e-9, atol=1e-12, msg=n)


def test_cache_decoding_skips_restart_detection(monkeypatch):
    import pronghorn.models.decoder as decoder

    seen = []

    def spy(*args):
        seen.append(args[-1])
        return build_attention_mask(*args)

    monkeypatch.setattr(decoder, "build_attention_mask", spy)
    _, model = make_pair("llama3_gqa_rope_scaling")
    cfg = model.config
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        full = model(input_ids=ids, position_ids=torch.arange(6)[None]).logits
        cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, 8, torch.float32, "cpu")
        first = model(input_ids=ids[:, :4], position_ids=torch.arange(4)[None], past_key_values=cache).logits
        nxt = model(input_ids=ids[:, 4:], position_ids=torch.tensor([[4, 5]]), past_key_values=cache).logits
    torch.testing.assert_close(torch.cat([first, nxt], 1), full, rtol=1e-5, atol=1e-5)
    assert [p is not None for p in seen] == [True, True, False]  # with a past, positions are not inspected
