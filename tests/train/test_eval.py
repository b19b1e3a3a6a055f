"""Held-out evaluation: the loss is the token-weighted mean NLL of transformers' own logits (padded or packed rows),
the trainer logs it every eval_steps steps, and eval_split holds out whole rows with its seed."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import make_pair, random_examples, tiny_lora_model
from pronghorn.data.packing import pack_examples
from pronghorn.errors import PronghornError
from pronghorn.kernels import IGNORE_INDEX
from pronghorn.train.config import TrainConfig
from pronghorn.train.evaluate import evaluate_examples
from pronghorn.train.held_out import split_held_out
from pronghorn.train.trainer import Trainer


def _reference(hf, examples) -> tuple[float, int]:
    """Sum of -log p(label) over every predicted token from transformers' full logits, each example alone."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = hf(torch.tensor([ex["input_ids"]])).logits[0].double()
            labels = torch.tensor(ex["labels"][1:])
            total += float(F.cross_entropy(logits[:-1], labels, ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    return total, count


def test_eval_loss_is_the_token_weighted_nll_of_full_logits():
    """fp64, so the comparison is exact up to summation order: batches of 3 padded rows, and the same examples
    packed into rows of 40 tokens (documents kept apart by their positions), both equal the reference."""
    hf, ours = make_pair("llama3_gqa_rope_scaling", dtype=torch.float64)
    examples = random_examples(7, seed=3)
    total, count = _reference(hf, examples)
    padded = evaluate_examples(ours, examples, batch_size=3, pad_id=0)
    packed_rows = pack_examples(examples, 40)
    assert len(packed_rows) < len(examples)
    packed = evaluate_examples(ours, packed_rows, batch_size=2, pad_id=0)
    for result in (padded, packed):
        assert result.tokens == count
        assert abs(result.loss - total / count) <= 1e-12 * total / count, (result.loss, total / count)
        assert result.perplexity == math.exp(result.loss)
    # a token-weighted mean, not a mean of per-batch means: batches of different token counts would differ
    per_batch = [evaluate_examples(ours, examples[i:i + 3], 3, 0).loss for i in range(0, 7, 3)]
    assert abs(sum(per_batch) / len(per_batch) - padded.loss) > 1e-6


def test_eval_leaves_the_training_mode_as_it_was_and_refuses_an_empty_set():
    model = tiny_lora_model(dropout=0.5).train()
    examples = random_examples(4)
    first = evaluate_examples(model, examples, 2, 0)
    assert model.training and first == evaluate_examples(model, examples, 2, 0)  # no dropout while evaluating
    with pytest.raises(PronghornError, match="evaluation set is empty"):
        evaluate_examples(model, [], 2, 0)
    with pytest.raises(PronghornError, match="no predicted token"):
        evaluate_examples(model, [{"input_ids": [5, 6], "labels": [5, IGNORE_INDEX]}], 2, 0)


def test_trainer_logs_eval_rows_at_start_every_eval_steps_and_at_the_end(tmp_path, smollm2_tokenizer):
    model = tiny_lora_model()
    examples = random_examples(16)
    _, held = split_held_out(examples, 0.25, seed=4)
    before = evaluate_examples(model, held, 2, smollm2_tokenizer.pad_token_id)
    cfg = TrainConfig(output_dir=str(tmp_path), progress=False, gradient_checkpointing="off", max_steps=5,
                      batch_size=4, gradient_accumulation_steps=1, learning_rate=3e-2, eval_steps=2,
                      eval_batch_size=2, eval_on_start=True, eval_split=0.25, seed=4)
    result = Trainer(model, smollm2_tokenizer, examples, cfg, base_name="tiny").train()
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    assert evals[0]["eval_loss"] == before.loss and evals[0]["eval_tokens"] == before.tokens
    assert all(r["eval_perplexity"] == math.exp(r["eval_loss"]) for r in evals)
    assert result.eval_metrics == evals[-1] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]


def test_eval_split_holds_out_whole_rows_with_its_seed():
    examples = [{"input_ids": [i, i], "labels": [i, i]} for i in range(20)]
    train, held = split_held_out(examples, 0.25, seed=1)
    assert len(held) == 5 and len(train) == 15
    assert sorted(e["input_ids"][0] for e in train + held) == list(range(20))
    assert [e["input_ids"][0] for e in held] == sorted(e["input_ids"][0] for e in held)  # order kept
    assert split_held_out(examples, 0.25, seed=1) == (train, held)
    assert split_held_out(examples, 0.25, seed=2) != (train, held)
    assert len(split_held_out(examples, 0.001, seed=1)[1]) == 1  # at least one row
    with pytest.raises(PronghornError, match="leaves none to train on"):
        split_held_out(examples[:1], 0.5, seed=1)


def test_trainer_splits_raw_text_documents_before_cutting_blocks(tmp_path, smollm2_tokenizer):
    """With data_format='raw_text' the held-out rows are whole documents: no token sequence of a held-out
    document appears in a training block."""
    docs = [{"input_ids": [10 * d + k for k in range(7)], "labels": [10 * d + k for k in range(7)]} for d in range(8)]
    cfg = TrainConfig(output_dir=str(tmp_path), progress=False, data_format="raw_text", max_length=16,
                      eval_split=0.25, seed=5)
    trainer = Trainer(tiny_lora_model(), smollm2_tokenizer, docs, cfg, base_name="tiny")
    _, held = split_held_out(docs, 0.25, seed=5)
    held_ids = {t for d in held for t in d["input_ids"]}
    assert {t for r in trainer.eval_examples for t in r["input_ids"]} == held_ids
    assert not held_ids & {t for r in trainer.examples for t in r["input_ids"]}
    assert all(len(r["input_ids"]) == 16 for r in trainer.examples[:-1]) and trainer.packed
