"""``FastLanguageModel.from_pretrained(..., full_finetuning=True)``: every weight trains in a plain PyTorch loop and
under TRL's SFTTrainer (unpatched), and the saved model loads in transformers with equal logits."""

from __future__ import annotations

import pytest
import torch

from pronghorn import FastLanguageModel

ROWS = [{"prompt": "what is two and two?", "completion": " four, I think."},
        {"prompt": "name a colour", "completion": " blue is one."}] * 2


def _full(tiny_smollm2_dir):
    return FastLanguageModel.from_pretrained(str(tiny_smollm2_dir), dtype=torch.float32, full_finetuning=True)


def _same_logits_in_transformers(model, path, ids):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_plain_loop_trains_every_weight_and_saves_a_transformers_checkpoint(tiny_smollm2_dir, tmp_path, capsys):
    model, tok = _full(tiny_smollm2_dir)
    assert all(p.requires_grad for p in model.parameters())
    assert model.model.gradient_checkpointing == "auto"
    assert FastLanguageModel.get_peft_model(model, r=8) is model and model.lora_config is None
    assert "get_peft_model attaches no adapters" in capsys.readouterr().out
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = tok(["the quick brown fox", "jumps over the dog"], return_tensors="pt", padding=True)
    model.train()
    for _ in range(2):
        model(**ids, labels=ids["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    model.save_pretrained(tmp_path / "out")
    _same_logits_in_transformers(model, tmp_path / "out", ids["input_ids"])


def test_trl_sft_trainer_full_finetuning(tiny_smollm2_dir, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model, tok = _full(tiny_smollm2_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = trl.SFTConfig(output_dir=str(tmp_path), max_length=64, per_device_train_batch_size=2, max_steps=2,
                         learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                         save_strategy="no", use_cpu=True, seed=0, bf16=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(ROWS),
                             processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    # model.save_pretrained, not trainer.save_model: transformers' Trainer saves a model that is not its own
    # PreTrainedModel as a bare state dict (no config.json), which safetensors refuses for a tied table
    model.save_pretrained(tmp_path / "final")
    _same_logits_in_transformers(model, tmp_path / "final", tok(["a test"], return_tensors="pt")["input_ids"])
