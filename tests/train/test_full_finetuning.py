"""Full fine-tuning on one device (train/full_finetune.py) in the native trainer, on the CPU: every weight's
gradient equals transformers' on the same weights (with and without recompute), gradient accumulation equals the
big batch, a resumed run reproduces the loss curve exactly (fp32 AdamW, and bf16 weights with stochastic
rounding), and the saved model loads in transformers with equal logits."""

import json

import pytest
import torch

from full_finetune_cases import CASE, full_model, full_trainer as _trainer
from helpers import make_pair, random_examples
from pronghorn.data.collate import pad_batch
from pronghorn.errors import PronghornError
from pronghorn.train.config import TrainConfig
from pronghorn.train.full_finetune import make_full_finetuning


def _hf_grads(hf, examples) -> dict:
    """The plain reference: transformers' model on the same weights, the loss summed over the step's labelled
    tokens and divided by their count."""
    hf.train()
    batch = pad_batch(examples, 0)
    items = int((batch["labels"][:, 1:] != -100).sum())
    hf(**batch, num_items_in_batch=items).loss.backward()
    return {n: p.grad for n, p in hf.named_parameters()}


@pytest.mark.parametrize("mode", ["off", "on"])
def test_every_gradient_equals_transformers(tmp_path, mode):
    hf, ours = full_model()
    ours.gradient_checkpointing_enable(mode=mode)
    examples = random_examples(6)
    t = _trainer(tmp_path, examples, ours, batch_size=6)
    assert {id(p) for p in t.params} == {id(p) for p in ours.parameters()}  # every weight, the tied table once
    t.model.train()
    t.accumulate_gradients(examples)
    ref = _hf_grads(hf, examples)
    names = dict(ours.named_parameters())
    assert set(names) == set(ref) - {"lm_head.weight"}  # transformers lists the tied head apart
    for name, p in names.items():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-4, atol=1e-6 * float(ref[name].abs().max()),
                                   msg=name)


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    """fp32 differs from one big batch only by summation order (3e-5 of each tensor's largest gradient, as the
    LoRA test); after two optimizer steps the weights agree to the same order."""
    examples = random_examples(16)
    big = _trainer(tmp_path / "big", examples, batch_size=8, gradient_accumulation_steps=1)
    small = _trainer(tmp_path / "small", examples, batch_size=2, gradient_accumulation_steps=4)
    for t in (big, small):
        t.model.train()
    loss_big, _ = big.accumulate_gradients(examples[:8])
    loss_small, _ = small.accumulate_gradients(examples[:8])
    assert loss_small == pytest.approx(loss_big, rel=3e-6)
    for (name, p), q in zip(big.model.named_parameters(), small.model.parameters()):
        assert (p.grad - q.grad).abs().max() <= 3e-5 * p.grad.abs().max(), name
    for t in (big, small):
        t.optimizer.zero_grad(set_to_none=True)
        t.total_steps = 2
        t.train()
    for (name, p), q in zip(big.model.named_parameters(), small.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)


IN_BACKWARD = dict(optimizer_in_backward=True, gradient_accumulation_steps=1, max_grad_norm=0.0)


@pytest.mark.parametrize("dtype,optim,extra", [(torch.float32, "adamw_torch_fused", {}),
                                               (torch.bfloat16, "adamw_torch_fused", {}),
                                               (torch.float32, "adamw_torch", {}),
                                               (torch.bfloat16, "adamw_torch_fused", IN_BACKWARD),
                                               (torch.bfloat16, "adamw_bf16_sr_bf16_moments", IN_BACKWARD)],
                         ids=["fp32", "bf16-sr", "fp32-foreach", "bf16-sr-in-backward", "bf16-moments-in-backward"])
def test_resume_reproduces_the_loss_curve(tmp_path, dtype, optim, extra):
    """Interrupted after step 4 (checkpoint-3 the last saved) and resumed: the same losses, bit for bit. bf16
    weights with the default optim train with adamw_bf16_sr, whose rounding noise is a function of the step;
    with the step in the backward the per-weight optimizers' state is saved and restored the same way."""
    examples = random_examples(24)
    kw = {**dict(batch_size=2, gradient_accumulation_steps=2, max_steps=6, learning_rate=5e-3, warmup_steps=2,
                 lr_scheduler="cosine", max_grad_norm=1.0, optim=optim), **extra}
    full = _trainer(tmp_path / "full", examples, full_model(dtype)[1], **kw).train()
    cut = _trainer(tmp_path / "cut", examples, full_model(dtype)[1], save_steps=3, **kw)
    cut.total_steps = 4  # stop early as if interrupted after step 4
    cut.train()
    assert (tmp_path / "cut" / "checkpoint-3" / "sharded").is_dir()
    torch.manual_seed(123)  # a different process state must not matter
    resumed = _trainer(tmp_path / "cut", examples, full_model(dtype)[1], resume_from_checkpoint="latest",
                       **kw).train()
    assert resumed.losses == full.losses
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("full", "cut"))
    assert a == b


def test_the_saved_model_loads_in_transformers_with_equal_logits(tmp_path):
    import transformers

    examples = random_examples(8)
    t = _trainer(tmp_path, examples, max_steps=3, learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()
    assert all(not torch.equal(before[n], p) for n, p in t.model.named_parameters())  # every weight moved
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "adapter_config.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    batch = pad_batch(examples[:4], 0)
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = t.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], ref[mask], rtol=1e-5, atol=1e-5)


def test_embedding_learning_rate_applies_to_the_tables(tmp_path, capsys):
    t = _trainer(tmp_path, random_examples(4), embedding_learning_rate=1e-5)
    table = t.model.get_input_embeddings().weight
    groups = {id(p): g["peak_lr"] for g in t.optimizer.param_groups for p in g["params"]}
    assert groups[id(table)] == 1e-5 and set(groups.values()) == {1e-3, 1e-5}
    assert "other weights: 0.001" in capsys.readouterr().out


def test_settings_full_finetuning_cannot_combine_with():
    with pytest.raises(PronghornError, match="full_finetuning.*load_in_4bit"):
        TrainConfig(full_finetuning=True, load_in_4bit=True)
    with pytest.raises(PronghornError, match="method='dpo' needs a reference model.*loss_type='simpo'"):
        TrainConfig(full_finetuning=True, method="dpo")
    assert TrainConfig(full_finetuning=True, method="orpo").full_finetuning
    _, ours = make_pair(CASE)
    from pronghorn.models.lora import LoRAConfig, attach_lora

    attach_lora(ours, LoRAConfig(r=2), seed=0)
    with pytest.raises(PronghornError, match="LoRA adapters attached"):
        make_full_finetuning(ours)


def test_8bit_adamw_state_resumes_exactly(tmp_path):
    """bitsandbytes' 8-bit AdamW (it runs on the CPU too, outside the trainer): its quantization maps, shared by
    every weight, and its block scales (not of the weight's shape) save and restore; two more steps after a
    resume take the losses of two more steps without one."""
    bnb = pytest.importorskip("bitsandbytes")
    from pronghorn.train.sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint

    batch = pad_batch(random_examples(4), 0)

    def run(model, opt, steps):
        losses = []
        for _ in range(steps):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    def fresh():
        model = full_model()[1].train()
        return model, bnb.optim.AdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=0)

    model, opt = fresh()
    run(model, opt, 2)
    save_sharded_checkpoint(tmp_path / "checkpoint-2", model, opt, {"global_step": 2})
    expected = run(model, opt, 2)
    model, opt = fresh()
    load_sharded_checkpoint(tmp_path / "checkpoint-2", model, opt)
    assert run(model, opt, 2) == expected


def test_orpo_trains_every_weight_and_saves_a_transformers_checkpoint(tmp_path):
    """Reference-free preference training (ORPO) with full fine-tuning: the preference trainer on the same path."""
    from full_finetune_cases import TinyTokenizer
    from helpers import random_pairs
    from pronghorn.train.preference_trainer import PreferenceTrainer

    _, model = full_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(output_dir=str(tmp_path), progress=False, method="orpo", beta=0.3, full_finetuning=True,
                      batch_size=3, gradient_accumulation_steps=1, max_steps=2, learning_rate=1e-2)
    PreferenceTrainer(model, TinyTokenizer(), random_pairs(), cfg, base_name="tiny").train()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "adapter_config.json").exists()
