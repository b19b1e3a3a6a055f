"""train_on_responses_only (character search in the decoded text) against tokenize_record's offset-based
assistant masks, on the KTO demo conversations and the real SmolLM2 tokenizer; show_masked_sample."""

from __future__ import annotations

import copy
import json
import warnings

import pytest

from pronghorn.data import IGNORE_INDEX, tokenize_record
from pronghorn.data.chat_templates import (
    CHAT_TEMPLATES,
    get_chat_template,
    show_masked_sample,
    train_on_responses_only,
)
from pronghorn.errors import DataError

CHATML = CHAT_TEMPLATES["chatml"].jinja


@pytest.fixture(scope="module")
def kto_rows(data_dir):
    return json.loads((data_dir / "llamafactory-demo" / "kto_en_demo.json").read_text())[:80]


def _tokenized(rows, tok, template, **kw):
    return [tokenize_record({"messages": r["messages"]}, tok, max_length=None, chat_template=template, **kw) for r in rows]


def test_equals_offset_masks_on_chatml(kto_rows, smollm2_tokenizer):
    reference = _tokenized(kto_rows, smollm2_tokenizer, CHATML)
    unmasked = [{"input_ids": r["input_ids"], "labels": list(r["input_ids"])} for r in reference]
    out = train_on_responses_only(
        unmasked, "<|im_start|>user\n", "<|im_start|>assistant\n", tokenizer=smollm2_tokenizer
    )
    assert [r["labels"] for r in out] == [r["labels"] for r in reference]
    assert [r["input_ids"] for r in out] == [r["input_ids"] for r in reference]
    assert unmasked[0]["labels"] == unmasked[0]["input_ids"]  # the input rows are not modified


def test_last_response_only(kto_rows, smollm2_tokenizer):
    reference = _tokenized(kto_rows, smollm2_tokenizer, CHATML, train_on="last_assistant")
    out = train_on_responses_only(
        [{"input_ids": r["input_ids"]} for r in reference], "<|im_start|>user\n", "<|im_start|>assistant\n",
        tokenizer=smollm2_tokenizer, last_response_only=True,
    )
    assert [r["labels"] for r in out] == [r["labels"] for r in reference]


def test_trainer_like_object_and_default_parts(kto_rows, smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_chat_template(tok, "llama-3.1")
    reference = _tokenized(kto_rows[:20], tok, tok.chat_template)

    class Trainer:
        processing_class = tok
        train_dataset = [{"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"])} for r in reference]
        eval_dataset = None

    trainer = Trainer()
    assert train_on_responses_only(trainer) is trainer  # parts inferred from the built-in llama-3.1 template
    assert [r["labels"] for r in trainer.train_dataset] == [r["labels"] for r in reference]


def test_padding_is_masked(smollm2_tokenizer):
    row = tokenize_record(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]},
        smollm2_tokenizer, chat_template=CHATML,
    )
    pad = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    n = len(row["input_ids"])
    padded = {"input_ids": row["input_ids"] + [pad] * 3, "attention_mask": [1] * n + [0] * 3}
    (out,) = train_on_responses_only([padded], "<|im_start|>user\n", "<|im_start|>assistant\n",
                                     tokenizer=smollm2_tokenizer)
    assert out["labels"] == row["labels"] + [IGNORE_INDEX] * 3


def test_row_without_response_part_is_named(smollm2_tokenizer):
    good = tokenize_record(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        smollm2_tokenizer, chat_template=CHATML,
    )
    bad = {"input_ids": smollm2_tokenizer.encode("just some text", add_special_tokens=False)}
    with pytest.raises(DataError, match=r"row 1: response_part '<\|im_start\|>assistant\\n' does not occur"):
        train_on_responses_only([good, bad], "<|im_start|>user\n", "<|im_start|>assistant\n",
                                tokenizer=smollm2_tokenizer)
    with pytest.raises(ValueError, match="tokenizer="):
        train_on_responses_only([good], "a", "b")


def test_show_masked_sample(smollm2_tokenizer):
    row = tokenize_record(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]},
        smollm2_tokenizer, chat_template=CHATML,
    )
    shown = show_masked_sample(row, smollm2_tokenizer)
    assert shown == (
        "[[<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n]]Hello!<|im_end|>"
        "[[\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n]]Ciao<|im_end|>[[\n]]"
    )
    assert show_masked_sample(row, smollm2_tokenizer, markers=("<", ">")).startswith("<<|im_start|>user")
