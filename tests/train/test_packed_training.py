"""Padding-free training: a step on packed rows has the gradients of the same sequences padded and unpacked."""

import pytest
import torch

from helpers import random_examples, tiny_lora_model
from pronghorn.data.packing import collate_packed
from pronghorn.train.config import TrainConfig
from pronghorn.train.trainer import Trainer


def _trainer(tmp_path, tok, examples, dtype, **kw):
    model = tiny_lora_model(dtype=dtype).train()
    with torch.no_grad():  # B starts at zero; give it values so A's gradients are tested too
        g = torch.Generator().manual_seed(7)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    cfg = TrainConfig(output_dir=str(tmp_path), progress=False, gradient_checkpointing="off", **kw)
    return Trainer(model, tok, examples, cfg, base_name="tiny")


def _grads(trainer):
    return {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_packed_step_equals_unpacked_step(tmp_path, smollm2_tokenizer, dtype, tol):
    """One accumulated step over packed rows (micro-batches of 2 rows and 1, rows of up to 40 tokens holding
    several sequences) against all sequences padded in one batch: same loss, same gradients (tolerance
    relative to each tensor's largest gradient; fp64 shows the algebra is exact)."""
    examples = random_examples(10)
    plain = _trainer(tmp_path / "a", smollm2_tokenizer, examples, dtype, batch_size=10, gradient_accumulation_steps=1)
    packed = _trainer(tmp_path / "b", smollm2_tokenizer, examples, dtype, packing=True, max_length=40,
                      batch_size=2, gradient_accumulation_steps=2)
    rows = packed.examples
    assert len(rows) == 3 and sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    assert packed.steps_per_epoch == 1 and all(r["position_ids"].count(0) >= 2 for r in rows)
    loss_plain, tokens_plain = plain.accumulate_gradients(examples)
    loss_packed, tokens_packed = packed.accumulate_gradients(packed.step_examples(0))
    assert tokens_packed == tokens_plain
    assert abs(loss_packed - loss_plain) <= tol * abs(loss_plain)
    reference = _grads(plain)
    for name, g in _grads(packed).items():
        assert (g - reference[name]).abs().max() <= tol * reference[name].abs().max(), name


def test_positions_are_what_keeps_sequences_apart(tmp_path, smollm2_tokenizer):
    """Guard: the same packed rows with positions running on (no restarts, so no document mask) give
    another loss, so the test above would see attention crossing a boundary."""
    examples = random_examples(10)
    packed = _trainer(tmp_path, smollm2_tokenizer, examples, torch.float32, packing=True, max_length=40,
                      batch_size=4, gradient_accumulation_steps=1)
    batch = collate_packed(packed.examples, 2)
    with torch.no_grad():
        separate = float(packed.model(**batch).loss)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        crossing = float(packed.model(**batch).loss)
    assert abs(separate - crossing) > 1e-3


def test_packed_steps_learn(tmp_path, smollm2_tokenizer):
    """Steps over shuffled packed rows (the epoch order the trainer uses) bring the loss down."""
    examples = random_examples(12)
    t = _trainer(tmp_path, smollm2_tokenizer, examples, torch.float32, packing=True, max_length=32,
                 batch_size=2, gradient_accumulation_steps=1, learning_rate=3e-2, lr_scheduler="constant")
    losses = [t.train_step(t.step_examples(step % t.steps_per_epoch))[0] for step in range(2 * t.steps_per_epoch)]
    assert sum(losses[-t.steps_per_epoch:]) < sum(losses[:t.steps_per_epoch])
