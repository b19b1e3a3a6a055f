"""Pre-tokenized rows (input_ids + optional labels / completion_mask / assistant_masks): pass-through checked
token by token against the tokenized originals, and bad rows named by file/row/field."""

from __future__ import annotations

import json

import pytest

from pronghorn.data import (
    IGNORE_INDEX,
    TOKENIZED,
    detect_format,
    load_records,
    tokenize_dataset,
    tokenize_record,
    validate_record,
)
from pronghorn.errors import DataError


@pytest.fixture(scope="module")
def kto_tokenized(data_dir, smollm2_tokenizer):
    recs = load_records(data_dir / "llamafactory-demo" / "kto_en_demo.json")[:60]
    return tokenize_dataset(recs, smollm2_tokenizer, max_length=None, progress=False)


def test_detect():
    assert detect_format({"input_ids": [1, 2], "text": "ignored"}) == TOKENIZED
    assert validate_record({"input_ids": [1, 2], "labels": [-100, 2]}).tokens == {"input_ids": [1, 2],
                                                                                   "labels": [-100, 2]}


def test_labels_and_masks_pass_through(kto_tokenized, smollm2_tokenizer):
    tok = smollm2_tokenizer
    for out in kto_tokenized:
        ids, labels = out["input_ids"], out["labels"]
        mask = [int(lab != IGNORE_INDEX) for lab in labels]
        assert tokenize_record({"input_ids": ids, "labels": labels}, tok, max_length=None) == out
        assert tokenize_record({"input_ids": ids, "assistant_masks": mask}, tok, max_length=None) == out
        assert tokenize_record({"input_ids": ids, "completion_mask": mask}, tok, max_length=None) == out
        both = tokenize_record({"input_ids": ids, "completion_mask": mask, "assistant_masks": [1] * len(ids)}, tok,
                               max_length=None)
        assert both == out
        plain = tokenize_record({"input_ids": ids}, tok, max_length=None)
        assert plain == {"input_ids": ids, "labels": ids}  # no labels, no mask: every token trained
        cut = tokenize_record({"input_ids": ids, "labels": labels}, tok, max_length=len(ids) - 1)
        assert cut == {"input_ids": ids[:-1], "labels": labels[:-1]}
    rows = [{"input_ids": o["input_ids"], "labels": o["labels"]} for o in kto_tokenized]
    assert tokenize_dataset(rows, tok, max_length=None, progress=False) == kto_tokenized


BAD = [
    ({"input_ids": []}, "input_ids", ["empty"]),
    ({"input_ids": "1 2 3"}, "input_ids", ["list of integers", "string"]),
    ({"input_ids": [1, 2.0, 3]}, "input_ids[1]", ["integer"]),
    ({"input_ids": [1, True]}, "input_ids[1]", ["integer", "boolean"]),
    ({"input_ids": [1, -5]}, "input_ids[1]", [">= 0"]),
    ({"input_ids": [1, 99999999]}, "input_ids[1]", ["out of the tokenizer's vocabulary range [0, 49152)"]),
    ({"input_ids": [1, 2, 3], "labels": [1, 2]}, "labels", ["2 entries", "3"]),
    ({"input_ids": [1, 2, 3], "labels": [-100, 3, 3]}, "labels[1]", ["must be -100 or equal", "not shifted"]),
    ({"input_ids": [1, 2, 3], "labels": [-100, -7, 3]}, "labels[1]", ["-100"]),
    ({"input_ids": [1, 2, 3], "completion_mask": [0, 1]}, "completion_mask", ["equal length"]),
    ({"input_ids": [1, 2, 3], "assistant_masks": [0, 2, 1]}, "assistant_masks[1]", ["0 or 1"]),
    ({"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}, "input_ids", ["no trainable token"]),
    ({"input_ids": [1, 2, 3], "completion_mask": [1, 0, 0]}, "input_ids", ["no trainable token"]),
]


@pytest.mark.parametrize("row, field, words", BAD)
def test_bad_rows_name_file_row_field(tmp_path, smollm2_tokenizer, row, field, words):
    path = tmp_path / "tok.json"
    path.write_text(json.dumps([{"input_ids": [1, 2]}, row]))
    with pytest.raises(DataError) as e:
        tokenize_dataset(load_records(path), smollm2_tokenizer, progress=False)
    msg = str(e.value)
    assert "tok.json index 1 (0-based)" in msg and f"field '{field}'" in msg, msg
    for w in words:
        assert w in msg, (w, msg)
