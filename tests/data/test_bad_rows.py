"""Bad rows: an error naming file, row and field, or (skip_bad_rows=True) left out with a count and a warning."""

from __future__ import annotations

import json
import logging
import re

import pytest

from pronghorn.data import load_records, tokenize_dataset, tokenize_record
from pronghorn.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
BAD = [  # (row, field named, words): one of each kind the issue lists
    ({"prompt": "p"}, "completion", "missing"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]},
     "messages[0].role", "expected 'user' as the first message"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "  "}]},
     "messages[1].content", "is empty"),
    ({"messages": [{"role": "user", "content": ["u"]}, {"role": "assistant", "content": "a"}]},
     "messages[0].content", "must be a string, got list"),
]


@pytest.fixture
def mixed(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [GOOD] + [row for row, _, _ in BAD] + [GOOD]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_records(path)


def test_each_bad_row_is_named(mixed, smollm2_tokenizer):
    with pytest.raises(DataError) as e:
        tokenize_dataset(mixed, smollm2_tokenizer, fmt="messages", progress=False)
    msg = str(e.value)
    assert msg.startswith("4 bad rows") and "pass skip_bad_rows=True (CLI: --skip-bad-rows) to" in msg
    for line in range(2, 2 + len(BAD)):
        assert f"mixed.jsonl line {line}: field " in msg
    for _, field, words in BAD[1:]:
        assert f"field {field!r}: " in msg and words in msg, msg
    with pytest.raises(DataError, match=r"mixed.jsonl line 2: field 'completion': missing"):
        tokenize_record(mixed[1], smollm2_tokenizer)


def test_skip_bad_rows_counts_and_warns(mixed, smollm2_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="pronghorn.data"):
        out, stats = tokenize_dataset(mixed, smollm2_tokenizer, fmt="messages", progress=False,
                                      skip_bad_rows=True, return_stats=True)
    assert len(out) == 2 and out[0] == out[1] == tokenize_record(GOOD, smollm2_tokenizer)
    assert stats["rows"] == 6 and stats["skipped"] == 4 and stats["examples"] == 2
    assert len(stats["bad_rows"]) == 4 and "mixed.jsonl line 3" in stats["bad_rows"][1]
    assert "skipped 4 bad row(s) of 6" in caplog.text and "mixed.jsonl line 5" in caplog.text
    with pytest.raises(DataError, match="no usable row: all 4 rows"):
        tokenize_dataset(mixed[1:5], smollm2_tokenizer, fmt="messages", progress=False, skip_bad_rows=True)


@pytest.mark.parametrize("dropped, template", [
    ("system", "{% for m in messages %}{% if m['role'] != 'system' %}"
               "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    ("user", "{% for m in messages %}{% if m['role'] != 'user' %}"
             "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
])
def test_template_that_drops_a_message(dropped, template, smollm2_tokenizer):
    row = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello!"}]}
    field = "messages[0]" if dropped == "system" else "messages[1]"
    expected = f"field '{field}': the chat template drops this '{dropped}' message"
    with pytest.raises(DataError, match=re.escape(expected)):
        tokenize_record(row, smollm2_tokenizer, chat_template=template)
