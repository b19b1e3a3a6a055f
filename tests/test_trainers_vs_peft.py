"""pronghorn's LoRA model and transformers + PEFT's under the same TRL trainer (SFT, DPO, KTO), fp32 on the CPU:
the same base weights and LoRA initialisation, gradient accumulation over micro-batches of rows of different
lengths. Every step's logged loss agrees within 1e-5 relative and so do the final LoRA weights. Losses are
compared step by step because the weights alone would hide a uniform gradient scale (clipping and Adam remove
it): that is how a wrong ``num_items_in_batch`` (the Trainer's token count) showed, as a loss (tokens - rows) /
tokens too low at every step."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from lora_twins import copy_lora, lora_twins, lora_weights, peft_config  # noqa: E402

COMMON = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2,
              lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
              seed=0, bf16=False, gradient_checkpointing=False, disable_tqdm=True, max_length=64)


def _chats(n=12):
    return [{"messages": [{"role": "user", "content": "Count " + "and again " * (i % 5)},
                          {"role": "assistant", "content": " ".join(str(k) for k in range(1 + 3 * i % 7))}]}
            for i in range(n)]


def _pairs(n=12):
    return [{"prompt": [{"role": "user", "content": "Say " + "it " * (i % 4) + str(i)}],
             "chosen": [{"role": "assistant", "content": str(i)}],
             "rejected": [{"role": "assistant", "content": "no, " + ", ".join(str(i + k) for k in range(i % 5))}]}
            for i in range(n)]


def _kto_rows(n=12):
    return [{"prompt": [{"role": "user", "content": "Say " + "it " * (i % 3) + str(i)}],
             "completion": [{"role": "assistant", "content": str(i) if i % 2 else "no, " + "more " * (i % 4)}],
             "label": bool(i % 2)} for i in range(n)]


def _losses(trainer) -> list[float]:
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _assert_twins_trained_alike(ours_trainer, hf_trainer):
    ours, hf = ours_trainer.model, hf_trainer.model
    ours_losses, hf_losses = _losses(ours_trainer), _losses(hf_trainer)
    assert len(ours_losses) == COMMON["max_steps"] == len(hf_losses)
    assert ours_losses == pytest.approx(hf_losses, rel=1e-5), (ours_losses, hf_losses)
    for name, got, ref in lora_weights(ours, hf):
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())), name


def _twin_trainers(trainer_cls, config_cls, checkpoint_dir, tmp_path, rows, **settings):
    """(trainer of pronghorn's model, trainer of transformers + PEFT's) with equal weights, data and settings."""
    ours, hf = lora_twins(checkpoint_dir)
    tok = transformers.AutoTokenizer.from_pretrained(checkpoint_dir)
    data = datasets.Dataset.from_list(rows)
    extra = {} if trainer_cls is trl.SFTTrainer else {"ref_model": ours.as_reference()}
    mine = trainer_cls(model=ours, processing_class=tok, train_dataset=data, **extra,
                       args=config_cls(output_dir=str(tmp_path / "ours"), **COMMON, **settings))
    theirs = trainer_cls(model=hf, processing_class=tok, train_dataset=data, peft_config=peft_config(),
                         args=config_cls(output_dir=str(tmp_path / "hf"), **COMMON, **settings))
    copy_lora(ours, theirs.model)
    return mine, theirs


def test_sft_trainer_same_steps_as_peft(tiny_smollm2_dir, tmp_path):
    mine, theirs = _twin_trainers(trl.SFTTrainer, trl.SFTConfig, tiny_smollm2_dir, tmp_path, _chats())
    batch = next(iter(mine.get_train_dataloader()))
    lengths = batch["attention_mask"].sum(-1)
    assert lengths.min() < lengths.max()  # padded rows of different lengths
    _assert_twins_trained_alike(mine, theirs)


def test_dpo_trainer_same_steps_as_peft(tiny_smollm2_dir, tmp_path):
    _assert_twins_trained_alike(*_twin_trainers(trl.DPOTrainer, trl.DPOConfig, tiny_smollm2_dir, tmp_path,
                                                _pairs(), beta=0.2))


def test_kto_trainer_same_steps_as_peft(tiny_smollm2_dir, tmp_path):
    _assert_twins_trained_alike(*_twin_trainers(trl.KTOTrainer, trl.KTOConfig, tiny_smollm2_dir, tmp_path,
                                                _kto_rows(), beta=0.3, desirable_weight=1.2, undesirable_weight=0.8))
