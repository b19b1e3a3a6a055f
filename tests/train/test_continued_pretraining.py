"""Continued pretraining of the real default model (SmolLM2-135M-Instruct, CPU) on raw text: a block's documents
do not see each other, and a few steps on C4 documents lower the perplexity of held-out C4 documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pronghorn
from pronghorn.data.raw_text import raw_text_blocks
from pronghorn.kernels import IGNORE_INDEX
from pronghorn.models.loader import load_pretrained

C4 = Path("/work/shared/data/llamafactory-demo/c4_demo.jsonl")  # Apache-2.0 repo, C4 text (ODC-BY); read, not copied
HELD_OUT = (5, 6, 7)  # three short documents (413 predicted tokens)


@pytest.fixture(scope="module")
def c4_rows() -> list[str]:
    if not C4.is_file():
        pytest.skip(f"shared raw-text demo not found at {C4}")
    return C4.read_text().splitlines()


def test_a_block_computes_each_document_as_if_alone(smollm2_dir, c4_rows):
    """fp64, real weights: each sequence of each block (a document, or a document's continuation after a block
    end) has the logits of that sequence run alone, and the block's loss sum is the sum of theirs: nothing crosses
    a boundary, neither attention nor a label."""
    loaded = load_pretrained(str(smollm2_dir), torch.float64, "cpu")
    model, tok = loaded.model.eval(), loaded.tokenizer
    docs = [json.loads(c4_rows[i])["text"][:160] for i in range(4)]  # four documents of ~30-40 tokens
    blocks = raw_text_blocks(docs, tok, 48, progress=False)
    assert len(blocks) >= 2
    sequences = 0
    with torch.no_grad():
        for block in blocks:
            ids, labels = torch.tensor([block["input_ids"]]), torch.tensor([block["labels"]])
            out = model(ids, position_ids=torch.tensor([block["position_ids"]]), labels=labels, num_items_in_batch=1)
            starts = [i for i, p in enumerate(block["position_ids"]) if p == 0] + [ids.shape[1]]
            alone_sum = 0.0
            for s, e in zip(starts, starts[1:]):
                alone = model(ids[:, s:e])
                scale = alone.logits.abs().max()
                assert (out.logits[:, s:e] - alone.logits).abs().max() <= 1e-10 * scale, (s, e)
                assert labels[0, s] == IGNORE_INDEX  # a sequence's first token is not predicted from the one before
                alone_sum += float(F.cross_entropy(alone.logits[0, :-1], labels[0, s + 1:e], reduction="sum"))
                sequences += 1
            assert abs(float(out.loss) - alone_sum) <= 1e-10 * alone_sum
    assert sequences > len(docs)  # some document was cut by a block end and continued


@pytest.mark.slow  # ~20 s of CPU alone (4 x 256 tokens forward + backward, 2 x 413 forward); minutes on a busy CPU
def test_continued_pretraining_lowers_held_out_perplexity(smollm2_dir, c4_rows, tmp_path):
    """The issue's acceptance: LoRA on raw C4 text through pronghorn.train (data_format='raw_text', blocks of 64
    tokens), 4 steps at a constant learning rate, fp32; the held-out documents are evaluated before the first
    step and after the last (eval_on_start, eval_data)."""
    train = tmp_path / "c4_train.jsonl"
    held = tmp_path / "c4_held_out.jsonl"
    train.write_text("\n".join(r for i, r in enumerate(c4_rows[:43]) if i not in HELD_OUT) + "\n")
    held.write_text("\n".join(c4_rows[i] for i in HELD_OUT) + "\n")
    result = pronghorn.train(model=str(smollm2_dir), data=str(train), data_format="raw_text", eval_data=str(held),
                             eval_on_start=True, max_length=64, max_steps=4, batch_size=4,
                             gradient_accumulation_steps=1, learning_rate=1e-3, lr_scheduler="constant",
                             eval_batch_size=8, dtype="float32", device="cpu", gradient_checkpointing="off",
                             output_dir=str(tmp_path / "out"), progress=False)
    evals = [r for r in map(json.loads, result.metrics_file.read_text().splitlines()) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4] and evals[0]["eval_tokens"] == evals[1]["eval_tokens"] > 400
    start, final = evals[0]["eval_perplexity"], evals[1]["eval_perplexity"]
    assert final < 0.95 * start, f"held-out perplexity went from {start:.3f} to {final:.3f} in 4 steps"
    print(f"held-out perplexity {start:.3f} -> {final:.3f}")
