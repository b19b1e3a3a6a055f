"""Truncation side (keep_start / keep_end) and the overlong-row policy (truncate, split, drop, error) with counts."""

from __future__ import annotations

import logging

import pytest

from pronghorn.data import IGNORE_INDEX, tokenize_dataset, tokenize_record
from pronghorn.data.truncation import fit_to_length
from pronghorn.data.records import Record
from pronghorn.errors import DataError

CHAT = {"messages": [{"role": "user", "content": "Name three colours of the rainbow, please."},
                     {"role": "assistant", "content": "Red, orange and yellow are three of them."}]}


def test_keep_start_and_keep_end(smollm2_tokenizer):
    full = tokenize_record(CHAT, smollm2_tokenizer, max_length=None)
    n = len(full["input_ids"])
    start = tokenize_record(CHAT, smollm2_tokenizer, max_length=n - 5)
    end = tokenize_record(CHAT, smollm2_tokenizer, max_length=n - 5, truncation_mode="keep_end")
    assert start == {k: v[: n - 5] for k, v in full.items()}
    assert end == {k: v[5:] for k, v in full.items()}
    # keep_end keeps the answer even when the prompt is cut away entirely
    first_trained = next(t for t, lab in enumerate(full["labels"]) if lab != IGNORE_INDEX)
    short = n - first_trained
    with pytest.raises(DataError, match=f"no trainable token after truncation to {short} tokens"):
        tokenize_record(CHAT, smollm2_tokenizer, max_length=short)
    tail = tokenize_record(CHAT, smollm2_tokenizer, max_length=short, truncation_mode="keep_end")
    assert tail["labels"] == full["labels"][first_trained:]
    with pytest.raises(ValueError, match="truncation_mode"):
        tokenize_record(CHAT, smollm2_tokenizer, truncation_mode="middle")


def test_fit_to_length_policies():
    rec = Record("data.jsonl", 4, {}, "line")
    ids = list(range(10))
    labels = [IGNORE_INDEX] * 3 + ids[3:]
    assert fit_to_length(rec, "text", ids, labels, 10) == ([{"input_ids": ids, "labels": labels}], None)
    assert fit_to_length(rec, "text", ids, labels, 4, overlong="drop") == ([], "dropped")
    chunks, outcome = fit_to_length(rec, "text", ids, labels, 4, overlong="split")
    assert outcome == "split" and [c["input_ids"] for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunks[0]["labels"] == [IGNORE_INDEX] * 3 + [3]
    # a chunk whose only trained label sits at position 0 has nothing to learn and is left out
    chunks, _ = fit_to_length(rec, "text", ids, [IGNORE_INDEX] * 4 + ids[4:], 4, overlong="split")
    assert [c["input_ids"][0] for c in chunks] == [4, 8]
    with pytest.raises(DataError, match=r"data.jsonl line 4: field 'text': the row has 10 tokens, more than max"):
        fit_to_length(rec, "text", ids, labels, 4, overlong="error")
    with pytest.raises(DataError, match=r"field 'text': no trainable token \(the row has 10 tokens"):
        fit_to_length(rec, "text", ids, [IGNORE_INDEX] * 10, None)


def test_dataset_overlong_policies_report_counts(smollm2_tokenizer, caplog):
    rows = [{"text": "short"}, {"text": "a much longer line of text " * 6}, {"text": "tiny"}]
    lengths = [len(tokenize_record(r, smollm2_tokenizer, max_length=None)["input_ids"]) for r in rows]
    limit = 16
    assert lengths[1] > 2 * limit and max(lengths[0], lengths[2]) <= limit
    with caplog.at_level(logging.WARNING, logger="pronghorn.data"):
        out, stats = tokenize_dataset(rows, smollm2_tokenizer, max_length=limit, overlong="split",
                                      progress=False, return_stats=True)
    assert stats["split"] == 1 and stats["examples"] == len(out) == 2 + -(-lengths[1] // limit)
    assert "1 split" in caplog.text
    full = tokenize_record(rows[1], smollm2_tokenizer, max_length=None)["input_ids"]
    assert sum((ex["input_ids"] for ex in out[1:-1]), []) == full
    out, stats = tokenize_dataset(rows, smollm2_tokenizer, max_length=limit, overlong="drop", progress=False,
                                  return_stats=True)
    assert (len(out), stats["dropped"]) == (2, 1)
    out, stats = tokenize_dataset(rows, smollm2_tokenizer, max_length=limit, truncation_mode="keep_end",
                                  progress=False, return_stats=True)
    assert stats["truncated"] == 1 and out[1]["input_ids"] == full[-limit:]
    with pytest.raises(DataError, match=r"<memory> index 1 .*more than max_length=16 \(overlong='error' \(CLI: "
                       r"--overlong error\)\); raise max_length \(CLI: --max-length\) or choose overlong='truncate' "
                       r"\(CLI: --overlong truncate\)"):
        tokenize_dataset(rows, smollm2_tokenizer, max_length=limit, overlong="error", progress=False)
