"""Gemma 2 against transformers' Gemma2ForCausalLM (eager attention: SDPA cannot soft-cap): soft-capped scores
and logits, sandwich norms, query_pre_attn_scalar, sliding window on alternate layers. Logits/loss with padding:
tests/models/test_decoder_vs_hf.py; LoRA gradients: test_lora_vs_peft.py."""

import dataclasses

import pytest
import torch

from family_cases import RTOL, check_generation_with_cache, check_long_unpadded, check_packed_rows, rel
from helpers import make_pair, randomize_lora_b
from pronghorn.models.lora import LoRAConfig, attach_lora, set_lora_enabled
from pronghorn.train.preference_trainer import completion_logps


def test_past_the_sliding_window_matches_hf():
    check_long_unpadded("gemma2")


def test_packed_rows_match_hf_alone():
    check_packed_rows("gemma2")


def test_generation_with_cache_matches_hf():
    check_generation_with_cache("gemma2")


def test_parts():
    _, ours = make_pair("gemma2")
    cfg = ours.config
    assert cfg.layer_types == ["sliding_attention", "full_attention"] and cfg.sliding_window == 5
    assert cfg.parts.sandwich_norms and cfg.parts.attn_scale == 24 ** -0.5
    assert (cfg.parts.attn_softcap, cfg.parts.final_softcap) == (1.5, 3.0)
    names = {n.split(".", 3)[-1] for n, _ in ours.named_parameters() if ".layers.0." in n and "norm" in n}
    assert names == {"input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
                     "post_feedforward_layernorm.weight"}


def test_soft_capping_is_exercised():
    """The tiny config's caps change the result (so the tests above cover them), and the logits stay within the cap."""
    _, ours = make_pair("gemma2")
    ids = torch.randint(3, 97, (2, 19), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        capped = ours(input_ids=ids).logits
        assert capped.abs().max() < 3.0
        parts = ours.config.parts
        ours.config.parts = dataclasses.replace(parts, final_softcap=None)
        assert rel(capped, ours(input_ids=ids).logits) > 100 * RTOL
        for layer in ours.model.layers:
            layer.self_attn.softcap = None
        uncapped_scores = ours(input_ids=ids).logits
        ours.config.parts = parts
    assert rel(uncapped_scores, ours(input_ids=ids).logits) > 100 * RTOL


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text_softcap"])
def test_preference_log_probs_use_the_capped_chunked_head(name, monkeypatch):
    """DPO/KTO/ORPO's completion log-probs of a soft-capped family come from the chunked head (the model's
    logits are never built) and equal transformers' capped logits' log_softmax (fp32: 1e-5 relative); their
    LoRA gradients equal those through our own full capped logits (FP32 bounds of test_training_paths.py)."""
    hf, ours = make_pair(name)
    attach_lora(ours, LoRAConfig(r=4, lora_alpha=8), seed=2)
    randomize_lora_b(ours)
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(8))
    labels = ids.clone()
    labels[:, :4] = -100
    keep = labels[:, 1:] != -100
    with torch.no_grad():
        want_logits = ours(input_ids=ids).logits  # capped, as transformers' are (checked on the base below)
    full = want_logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    ours.zero_grad()
    logp = ours(input_ids=ids).logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    (logp * keep).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}

    def no_logits(*args, **kwargs):
        raise AssertionError("completion_logps built the logits")

    monkeypatch.setattr(ours.lm_head, "forward", no_logits)  # the logits path calls the head; the chunked one not
    ours.zero_grad()
    got, count = completion_logps(ours, {"input_ids": ids, "labels": labels})
    got.sum().backward()
    assert count.tolist() == [7, 7] and torch.allclose(got, (full * keep).sum(-1), rtol=1e-5)
    for n, g in want_grads.items():
        torch.testing.assert_close(dict(ours.named_parameters())[n].grad, g, rtol=1e-5, atol=1e-6, msg=n)

    set_lora_enabled(ours, False)
    with torch.no_grad():
        base, _ = completion_logps(ours, {"input_ids": ids, "labels": labels})
        hf_logp = hf(input_ids=ids).logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    assert torch.allclose(base, (hf_logp * keep).sum(-1), rtol=1e-5)
