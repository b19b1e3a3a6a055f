"""prepare_dataset: same output as tokenize_dataset, in worker processes, cached on disk by data + tokenizer +
settings (a hit skips tokenization; a change to any of the three misses)."""

from __future__ import annotations

import copy
import json

import pytest

import pronghorn.data.prepare as prepare
from pronghorn.data import load_records, tokenize_dataset
from pronghorn.errors import DataError


@pytest.fixture(scope="module")
def gsm8k_rows(data_dir):
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:300]]
    return [{"messages": [{"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": r["answer"]}]} for r in rows]


def test_matches_tokenize_dataset_in_processes(gsm8k_rows, smollm2_tokenizer, tmp_path):
    expected = tokenize_dataset(gsm8k_rows, smollm2_tokenizer, max_length=256, progress=False)
    for num_proc in (1, 2):
        out, stats = prepare.prepare_dataset(gsm8k_rows, smollm2_tokenizer, max_length=256, num_proc=num_proc,
                                             cache=False, progress=False, return_stats=True)
        assert out == expected and stats["cache"] == "off" and stats["truncated"] > 0
        assert stats["processes"] == num_proc


def test_cache_hits_and_is_invalidated(gsm8k_rows, smollm2_tokenizer, tmp_path, monkeypatch):
    rows = gsm8k_rows[:40]
    kw = dict(max_length=256, cache_dir=tmp_path, progress=False, return_stats=True, num_proc=1)
    first, stats = prepare.prepare_dataset(rows, smollm2_tokenizer, **kw)
    assert stats["cache"] == "miss" and len(list(tmp_path.glob("*.npz"))) == 1

    real = prepare.tokenize_batch
    calls = []
    monkeypatch.setattr(prepare, "tokenize_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, stats = prepare.prepare_dataset(rows, smollm2_tokenizer, **kw)
    assert stats["cache"] == "hit" and again == first and not calls  # read back, nothing tokenized
    untruncated = tokenize_dataset(rows, smollm2_tokenizer, max_length=None, progress=False)
    assert stats["truncated"] == sum(len(ex["input_ids"]) > 256 for ex in untruncated) > 0

    other_template = copy.deepcopy(smollm2_tokenizer)
    other_template.chat_template = smollm2_tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    added_token = copy.deepcopy(smollm2_tokenizer)
    added_token.add_tokens(["<extra_token>"])
    edited = copy.deepcopy(rows)
    edited[7]["messages"][1]["content"] += " Done."
    for tok, data, settings in [
        (other_template, rows, {}),  # tokenizer: chat template
        (added_token, rows, {}),  # tokenizer: vocabulary
        (smollm2_tokenizer, edited, {}),  # data: one row changed
        (smollm2_tokenizer, rows, {"max_length": 200}),  # settings
        (smollm2_tokenizer, rows, {"truncation_mode": "keep_end"}),
        (smollm2_tokenizer, rows, {"train_on": "last_assistant", "overlong": "drop"}),
    ]:
        _, stats = prepare.prepare_dataset(data, tok, **{**kw, **settings})
        assert stats["cache"] == "miss", settings
    assert len(calls) > 0 and len(list(tmp_path.glob("*.npz"))) == 7


def test_bad_rows_are_not_cached(smollm2_tokenizer, tmp_path, data_dir):
    records = load_records(data_dir / "llamafactory-demo" / "kto_en_demo.json")[:5]
    bad = records + [{"messages": [{"role": "user", "content": "u"}]}]
    for _ in range(2):
        with pytest.raises(DataError, match=r"must end with an 'assistant' message"):
            prepare.prepare_dataset(bad, smollm2_tokenizer, cache_dir=tmp_path, progress=False)
    out, stats = prepare.prepare_dataset(bad, smollm2_tokenizer, cache_dir=tmp_path, progress=False,
                                         skip_bad_rows=True, return_stats=True)
    assert len(out) == 5 and stats["skipped"] == 1 and not list(tmp_path.glob("*.npz"))
    with pytest.raises(ValueError, match="num_proc"):
        prepare.prepare_dataset(records, smollm2_tokenizer, num_proc=0, cache=False)
