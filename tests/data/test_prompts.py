"""GRPO prompt rows: plain and conversational prompts, gsm8k rows mapped, extra columns kept, errors naming the
row and field."""

from __future__ import annotations

import pytest

from pronghorn.data.prompts import prompt_rows
from pronghorn.errors import DataError


def test_prompt_rows_errors_name_the_row(smollm2_tokenizer):
    with pytest.raises(DataError, match="index 1 .*'prompt': missing"):
        prompt_rows([{"prompt": "hi"}, {"text": "no prompt"}], smollm2_tokenizer)
    with pytest.raises(DataError, match=r"prompt\[0\].role'.*ends with a user turn"):
        prompt_rows([{"prompt": [{"role": "assistant", "content": "x"}]}], smollm2_tokenizer)
    with pytest.raises(DataError, match="'answer': has no final '#### <number>' line"):
        prompt_rows([{"question": "q?", "answer": "no number"}], smollm2_tokenizer)
    rows = prompt_rows([{"prompt": "Say hi", "topic": "greeting"}], smollm2_tokenizer, max_prompt_length=2)
    assert rows[0]["topic"] == "greeting" and len(rows[0]["prompt_ids"]) == 2
