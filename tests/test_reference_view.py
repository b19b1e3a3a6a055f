"""pronghorn's LoRA model under TRL's DPOTrainer and KTOTrainer, unpatched, with no reference copy.

``ref_model=model.as_reference()`` (the policy with adapters disabled, owning no weights) is the no-copy
reference at every step; ``precompute_ref_log_probs=True`` with ``ref_model=None`` is the other route (one
scoring pass before the first step). On a batch with policy != reference, TRL's loss and gradients equal ours
(our log-probs, losses and adapters-disabled reference); a few steps train only the LoRA weights; no second
model exists; the checkpointing mode survives TRL's disable / re-enable around every reference forward."""

from __future__ import annotations

import gc

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from pronghorn.causal_lm import PronghornForCausalLM  # noqa: E402
from pronghorn.errors import PronghornError  # noqa: E402
from pronghorn.models.builder import init_random_model  # noqa: E402
from pronghorn.models.config import ModelConfig  # noqa: E402
from pronghorn.models.decoder import DecoderForCausalLM  # noqa: E402
from pronghorn.models.lora import LoRAConfig, attach_lora  # noqa: E402
from pronghorn.reference_view import ReferenceView  # noqa: E402
from pronghorn.train.preference_losses import dpo_loss, kto_kl, kto_loss  # noqa: E402
from pronghorn.train.preference_trainer import adapters_disabled, completion_logps  # noqa: E402

@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


COMMON = dict(per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, report_to="none", max_length=48,
              use_cpu=True, logging_steps=1, save_strategy="no", bf16=False, disable_tqdm=True, seed=0)


def _model(tok, lora_seed: int | None = 3) -> PronghornForCausalLM:
    cfg = ModelConfig.from_hf_dict(dict(
        model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        hidden_act="silu", tie_word_embeddings=True))
    torch.manual_seed(0)
    model = attach_lora(init_random_model(cfg, torch.float32, "cpu", model_cls=PronghornForCausalLM),
                        LoRAConfig(r=4, lora_alpha=8))
    if lora_seed is not None:  # B = 0 would make policy == reference: move it so the loss sees a difference
        g = torch.Generator().manual_seed(lora_seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _pairs(n=4):
    return [{"prompt": [{"role": "user", "content": f"Say {i}"}],
             "chosen": [{"role": "assistant", "content": f"{i}"}],
             "rejected": [{"role": "assistant", "content": f"no, {i + 1} or {i + 2}"}]} for i in range(n)]


def _kto_rows(n=4):
    return [{"prompt": [{"role": "user", "content": f"Say {i}"}],
             "completion": [{"role": "assistant", "content": f"{i}" if i % 2 else f"no, {i + 3}"}],
             "label": bool(i % 2)} for i in range(n)]


def _labels(ids, mask):
    return ids.masked_fill(mask == 0, -100)


def _logps(model, ids, attn, labels, reference=False):
    batch = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    if not reference:
        return completion_logps(model, batch)[0]
    with torch.no_grad(), adapters_disabled(model):
        return completion_logps(model, batch)[0]


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _only_lora_changed(model, before):
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    return bool(changed) and all("lora_" in n for n in changed)


def _live_models() -> set[int]:
    gc.collect()
    return {id(o) for o in gc.get_objects() if isinstance(o, DecoderForCausalLM)}


def _no_second_model(model, trainer, live_before: set[int]):
    ref = trainer.ref_model
    assert isinstance(ref, ReferenceView) and ref.policy is model
    assert list(ref.parameters()) == [] and list(ref.buffers()) == []
    assert id(model) in live_before and _live_models() == live_before  # the trainer built no model


def _trl_loss_and_grads(trainer, model):
    """TRL's loss on its first 4 collated rows and the LoRA gradients it gives (then cleared)."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.train()
    theirs = trainer.compute_loss(model, batch)
    theirs.backward()
    grads = _lora_grads(model)
    model.zero_grad(set_to_none=True)
    return batch, theirs, grads


def _assert_same_loss_and_grads(model, ours, theirs, grads_trl):
    """Our loss equals TRL's and its LoRA gradients equal the ones TRL's gave (then cleared)."""
    ours.backward()
    assert float(theirs.detach()) == pytest.approx(float(ours.detach()), rel=1e-5)
    for n, g in _lora_grads(model).items():
        assert torch.allclose(grads_trl[n], g, rtol=1e-4, atol=1e-6 * g.abs().max()), n
    model.zero_grad(set_to_none=True)


def test_dpo_trainer_with_reference_view(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = _model(tok)
    model.gradient_checkpointing_enable(mode="offload")
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.2, gradient_checkpointing=True, **COMMON)
    live = _live_models()
    trainer = trl.DPOTrainer(model=model, ref_model=model.as_reference(), args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(_pairs()))
    _no_second_model(model, trainer, live)

    batch, theirs, grads_trl = _trl_loss_and_grads(trainer, model)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    labels = _labels(ids, batch["completion_mask"])
    pol, ref = _logps(model, ids, attn, labels), _logps(model, ids, attn, labels, reference=True)
    assert (pol - ref).abs().max() > 0.05  # the reference really is another function than the policy
    ours = dpo_loss(pol[:4], pol[4:], ref[:4], ref[4:], beta=0.2).losses.mean()
    _assert_same_loss_and_grads(model, ours, theirs, grads_trl)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = trainer.train()
    assert out.global_step == 2 and _only_lora_changed(model, before)
    assert model.model.gradient_checkpointing == "offload"  # not turned into "on" by TRL's reference forwards
    assert all(m.lora_enabled for m in model.modules() if hasattr(m, "lora_enabled"))


def test_kto_trainer_with_reference_view(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = _model(tok)
    args = trl.KTOConfig(output_dir=str(tmp_path), beta=0.3, desirable_weight=1.2, undesirable_weight=0.8,
                         gradient_checkpointing=False, **COMMON)
    live = _live_models()
    trainer = trl.KTOTrainer(model=model, ref_model=model.as_reference(), args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(_kto_rows()))
    _no_second_model(model, trainer, live)

    batch, theirs, grads_trl = _trl_loss_and_grads(trainer, model)
    main = (batch["input_ids"], batch["attention_mask"], _labels(batch["input_ids"], batch["completion_mask"]))
    kl = (batch["KL_input_ids"], batch["KL_attention_mask"],
          _labels(batch["KL_input_ids"], batch["KL_completion_mask"]))
    label = torch.as_tensor(batch["label"], dtype=torch.bool)
    assert 0 < int(label.sum()) < 4
    pol, ref = _logps(model, *main), _logps(model, *main, reference=True)
    with torch.no_grad():
        kl_pol = _logps(model, *kl)
    estimate = kto_kl(kl_pol, _logps(model, *kl, reference=True))
    ours = kto_loss(pol[label], pol[~label], ref[label], ref[~label], estimate, beta=0.3, desirable_weight=1.2,
                    undesirable_weight=0.8).losses.mean()
    _assert_same_loss_and_grads(model, ours, theirs, grads_trl)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert trainer.train().global_step == 2 and _only_lora_changed(model, before)


def test_dpo_trainer_precomputed_reference_without_copy(tmp_path, smollm2_tokenizer):
    """The other no-copy route: ref_model=None, precompute_ref_log_probs=True. TRL scores the data with the
    policy before the first step, which is the base model only while the LoRA is fresh (B = 0)."""
    tok = smollm2_tokenizer
    model = _model(tok, lora_seed=None)
    args = trl.DPOConfig(output_dir=str(tmp_path), precompute_ref_log_probs=True, **{**COMMON, "max_steps": 1})
    trainer = trl.DPOTrainer(model=model, ref_model=None, args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(_pairs()))
    assert trainer.ref_model is None
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ids, attn = batch["input_ids"], batch["attention_mask"]
    labels = _labels(ids, batch["completion_mask"])
    ours = _logps(model, ids, attn, labels, reference=True)
    assert torch.allclose(ours, torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]), rtol=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = trainer.train()
    assert out.training_loss == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step
    assert _only_lora_changed(model, before)


def test_reference_view_is_the_base_model_and_owns_nothing(smollm2_tokenizer):
    model = _model(smollm2_tokenizer)
    view = model.as_reference()
    ids = torch.randint(0, 500, (2, 7))
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        policy = model(input_ids=ids).logits
    out = view(input_ids=ids).logits
    assert torch.equal(out, base) and not torch.equal(out, policy) and not out.requires_grad
    hidden = view.base_model(input_ids=ids).last_hidden_state
    with torch.no_grad():
        assert not torch.equal(hidden, model.model(ids))
        with model.disable_adapter():
            assert torch.equal(hidden, model.model(ids))
    assert view.get_output_embeddings() is model.lm_head and view.config is model.config
    assert view.state_dict().keys() == model.state_dict().keys()  # TRL's precompute cache key sees the policy
    model.train()
    view.eval()  # what a trainer does to its reference: the policy is not touched
    assert model.training and list(view.children()) == []
    with pytest.raises(PronghornError, match="needs a model with LoRA"):
        ReferenceView(init_random_model(model.config, torch.float32, "cpu", model_cls=PronghornForCausalLM))
