"""Best-fit-decreasing packing and the padding-free collator."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from pronghorn.data.packing import collate_packed, pack_examples
from pronghorn.errors import DataError
from tests.helpers import random_examples


def _unpack(row):
    """Split a packed row back into (input_ids, labels) sequences at position restarts."""
    pos = row["position_ids"]
    starts = [t for t in range(len(pos)) if t == 0 or pos[t] <= pos[t - 1]] + [len(pos)]
    out = []
    for s, e in zip(starts, starts[1:]):
        assert pos[s:e] == list(range(e - s))
        out.append((tuple(row["input_ids"][s:e]), tuple(row["labels"][s:e])))
    return out


def _check_packing(examples, rows, max_length):
    expected = Counter((tuple(ex["input_ids"]), tuple([-100] + list(ex["labels"][1:]))) for ex in examples)
    got = Counter()
    for row in rows:
        assert 0 < len(row["input_ids"]) <= max_length
        assert len(row["labels"]) == len(row["position_ids"]) == len(row["input_ids"])
        for ids, labels in _unpack(row):
            assert labels[0] == -100  # no prediction across a sequence boundary
            got[(ids, labels)] += 1
    assert got == expected  # every sequence, hence every token, exactly once
    total = sum(len(ex["input_ids"]) for ex in examples)
    assert len(rows) <= math.ceil(11 / 9 * math.ceil(total / max_length)) + 1  # BFD's bound


def test_bfd_random_examples():
    examples = random_examples(n=60, seed=3)
    rows, stats = pack_examples(examples, max_length=32, return_stats=True)
    _check_packing(examples, rows, 32)
    assert stats["sequences"] == 60 and stats["rows"] == len(rows) and stats["fill"] > 0.85
    assert pack_examples(examples, max_length=32) == rows  # deterministic


def test_bfd_best_fit_choice():
    # lengths 6,5,4,3,2 into 10: 6 -> A, 5 -> B, 4 -> A (fills it), 3 -> B, 2 -> B
    examples = [{"input_ids": [i + 1] * n} for i, n in enumerate([3, 6, 2, 5, 4])]
    rows = pack_examples(examples, max_length=10)
    assert [r["input_ids"] for r in rows] == [[2] * 6 + [5] * 4, [4] * 5 + [1] * 3 + [3] * 2]
    assert rows[1]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert rows[1]["labels"] == [-100, 4, 4, 4, 4, -100, 1, 1, -100, 3]  # labels default to input_ids


def test_bfd_gsm8k_smollm2(data_dir, smollm2_tokenizer):
    tok = smollm2_tokenizer
    lines = (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:150]
    examples = []
    for line in lines:
        r = json.loads(line)
        prompt = tok(f"Question: {r['question']}\nAnswer:")["input_ids"]
        answer = tok(" " + r["answer"])["input_ids"] + [tok.eos_token_id]
        examples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    rows = pack_examples(examples, max_length=1024)
    _check_packing(examples, rows, 1024)
    assert len(rows) < len(examples) / 4


def test_overlong_policies():
    examples = [{"input_ids": list(range(1, 6))}, {"input_ids": list(range(1, 13))}, {"input_ids": [7, 8]}]
    with pytest.raises(DataError, match=r"example 1 has 12 tokens.*max_length=5.*overlong='truncate' \(CLI: --overlong truncate\)"):
        pack_examples(examples, max_length=5)
    rows, stats = pack_examples(examples, max_length=5, overlong="truncate", return_stats=True)
    assert stats["truncated"] == 1 and stats["sequences"] == 3
    assert sorted(len(r["input_ids"]) for r in rows) == [2, 5, 5]
    rows, stats = pack_examples(examples, max_length=5, overlong="split", return_stats=True)
    assert stats["split"] == 1 and stats["sequences"] == 5  # 12 tokens -> 5 + 5 + 2
    assert sum(len(r["input_ids"]) for r in rows) == 5 + 12 + 2
    rows, stats = pack_examples(examples, max_length=5, overlong="drop", return_stats=True)
    assert stats["dropped"] == 1 and sum(len(r["input_ids"]) for r in rows) == 7


def test_bad_input():
    with pytest.raises(DataError, match="example 0: input_ids is empty"):
        pack_examples([{"input_ids": []}], 8)
    with pytest.raises(DataError, match="example 0"):
        pack_examples([{"input_ids": [1, 2], "labels": [1]}], 8)
    with pytest.raises(ValueError, match="strategy"):
        pack_examples([{"input_ids": [1]}], 8, strategy="ffd")


def test_collate_packed():
    rows = pack_examples(random_examples(n=12, seed=1), max_length=40)
    batch = collate_packed(rows, pad_token_id=0, pad_to_multiple_of=8)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # padding-free: no attention_mask
    b, t = batch["input_ids"].shape
    assert b == len(rows) and t % 8 == 0 and t >= 40
    for i, r in enumerate(rows):
        n, pad = len(r["input_ids"]), t - len(r["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == r["input_ids"]
        assert batch["labels"][i, :n].tolist() == r["labels"]
        assert (batch["input_ids"][i, n:] == 0).all() and (batch["labels"][i, n:] == -100).all()
        assert batch["position_ids"][i].tolist() == r["position_ids"] + list(range(pad))
    assert batch["position_ids"].dtype == torch.long


def test_concatenate_and_chunk():
    examples = [{"input_ids": list(range(100 * k, 100 * k + n))} for k, n in enumerate([5, 12, 3, 7])]
    rows, stats = pack_examples(examples, 8, strategy="chunk", return_stats=True)
    flat = [t for ex in examples for t in ex["input_ids"]]
    assert [len(r["input_ids"]) for r in rows] == [8, 8, 8, 3]  # every row full but the last
    assert sum((r["input_ids"] for r in rows), []) == flat  # order kept, every token once
    assert stats["rows"] == 4 and stats["tokens"] == 27
    # positions restart at each document start and at each row start (a continued document is a new sequence)
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows[1]["position_ids"] == list(range(8))
    assert rows[2]["position_ids"] == [0, 0, 1, 2, 0, 1, 2, 3]
    # the first label of every piece is masked: nothing is predicted across a boundary
    assert rows[0]["labels"] == [-100, 1, 2, 3, 4, -100, 101, 102]
    assert rows[2]["labels"][:2] == [-100, -100] and rows[2]["labels"][4] == -100


def test_truncate_keep_end():
    rows, stats = pack_examples([{"input_ids": list(range(10))}], 4, overlong="truncate",
                                truncation_mode="keep_end", return_stats=True)
    assert rows[0]["input_ids"] == [6, 7, 8, 9] and stats["truncated"] == 1
