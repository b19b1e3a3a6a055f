"""PronghornTrainer / PronghornTrainingArguments: TRL's SFTTrainer with ``embedding_learning_rate`` for the
tables trained fully beside the adapters (continued pretraining), on a tiny model with SmolLM2's tokenizer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from pronghorn import FastLanguageModel, PronghornError, PronghornTrainer, PronghornTrainingArguments  # noqa: E402
from pronghorn.models.lora import trained_modules  # noqa: E402

TEXTS = [{"text": f"The pronghorn number {i} runs across the plains at {40 + i} miles per hour."} for i in range(8)]


def _run(tiny_smollm2_dir, tmp_path, embedding_learning_rate, targets=("q_proj", "v_proj", "embed_tokens")):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_smollm2_dir), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=list(targets),
                                             use_gradient_checkpointing=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = PronghornTrainingArguments(output_dir=str(tmp_path), max_length=32, per_device_train_batch_size=4,
                                      max_steps=2, learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=0,
                                      report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0,
                                      embedding_learning_rate=embedding_learning_rate)
    trainer = PronghornTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(TEXTS),
                               processing_class=tok)
    trainer.train()
    changed = {n: not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if p.requires_grad}
    return trainer, model, changed


def test_the_tables_get_their_own_rate_and_the_schedule_scales_both(tiny_smollm2_dir, tmp_path):
    trainer, model, changed = _run(tiny_smollm2_dir, tmp_path, 1e-3)
    tables = {id(p) for _, p in trained_modules(model)}
    table_groups = [g for g in trainer.optimizer.param_groups if any(id(p) in tables for p in g["params"])]
    other_groups = [g for g in trainer.optimizer.param_groups if g["params"] and g not in table_groups]
    assert table_groups and all(all(id(p) in tables for p in g["params"]) for g in table_groups)
    assert {g["initial_lr"] for g in table_groups} == {1e-3} and {g["initial_lr"] for g in other_groups} == {1e-2}
    # linear decay over 2 steps: after the last step every group is at the same fraction of its peak
    assert {round(g["lr"] / g["initial_lr"], 9) for g in trainer.optimizer.param_groups if g["params"]} == {0.0}
    assert all(changed.values())


def test_rate_zero_freezes_the_tables_but_not_the_adapters(tiny_smollm2_dir, tmp_path):
    _, model, changed = _run(tiny_smollm2_dir, tmp_path, 0.0)
    table_names = {n for n, _ in trained_modules(model)}
    assert any(changed[n] for n in changed if "lora_" in n)
    assert not any(changed[n] for n in changed if any(t in n for t in table_names))


def test_a_rate_without_trained_tables_is_refused(tiny_smollm2_dir, tmp_path):
    with pytest.raises(PronghornError, match="embed_tokens / lm_head do not train"):
        _run(tiny_smollm2_dir, tmp_path, 1e-3, targets=("q_proj", "v_proj"))
