"""The decoder against transformers' own modeling code on tiny random configs of every family (fp32)."""

import pytest
import torch

from helpers import TINY_CONFIGS, make_pair

RTOL = 1e-5  # fp32: relative to the largest logit


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_and_loss_match_hf(name):
    hf, ours = make_pair(name)
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 23))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    mask[2, :6] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, 6] = -100  # its prediction comes from a padding position, whose output is unspecified
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert _rel(out.logits[real], ref.logits[real]) <= RTOL
    assert abs(out.loss.item() - ref.loss.item()) <= RTOL * abs(ref.loss.item())


@pytest.mark.parametrize("name", ["llama3_gqa_rope_scaling", "mistral_sliding", "qwen3_qknorm", "llama_dynamic_rope"])
def test_unpadded_long_sequence_matches_hf(name):
    """Beyond the sliding window and (for dynamic rope) beyond max_position_embeddings."""
    hf, ours = make_pair(name)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, out = hf(input_ids=ids).logits, ours(input_ids=ids).logits
    assert _rel(out, ref) <= RTOL


def test_tied_head_shares_embedding():
    _, ours = make_pair("smollm2_tied")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_training_forward_skips_logits_but_eval_returns_them():
    _, ours = make_pair("llama2")
    ids = torch.randint(0, 97, (2, 9))
    ours.train()
    out = ours(input_ids=ids, labels=ids)
    assert out.logits is None and out.loss.requires_grad
    ours.eval()
    with torch.no_grad():
        out = ours(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 9, 97)


def test_trainer_loss_contract_matches_hf(tmp_path):
    """What HF Trainer reads off a model to count ``num_items_in_batch``: a loss that shifts labels itself
    (counted over ``labels[..., 1:]``), taking the count; pre-shifted ``shift_labels`` given replace the labels."""
    from transformers import Trainer

    hf, ours = make_pair("llama3_gqa_rope_scaling")
    assert ours.loss_type == hf.loss_type == "ForCausalLM" and ours.accepts_loss_kwargs
    for model in (hf, ours):  # the Trainer's own reading of the two (no training run needed)
        trainer = Trainer(model=model, args=_trainer_args(tmp_path))
        assert trainer._loss_shifts_labels and trainer.model_accepts_loss_kwargs
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(4))
    shift = torch.nn.functional.pad(ids, (0, 1), value=-100)[..., 1:].contiguous()
    shift[0, :5] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=ids, shift_labels=shift, num_items_in_batch=torch.tensor(17)).loss
        out = ours(input_ids=ids, labels=ids, shift_labels=shift, num_items_in_batch=torch.tensor(17)).loss
        plain = ours(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(17)).loss
    assert abs(out.item() - ref.item()) <= RTOL * abs(ref.item()) and out < plain  # 5 targets fewer


def _trainer_args(tmp_path):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no")
