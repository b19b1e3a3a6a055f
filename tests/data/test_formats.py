"""detect_format / validate_record: format detection, overrides, and per-field errors naming file/row/field."""

from __future__ import annotations

import json

import pytest

from pronghorn.data import MESSAGES, PROMPT_COMPLETION, TEXT, detect_format, load_records, validate_record
from pronghorn.errors import DataError

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello!"}
S = {"role": "system", "content": "Be brief."}


def test_detect_real_datasets(data_dir):
    kto = load_records(data_dir / "llamafactory-demo" / "kto_en_demo.json")
    c4 = load_records(data_dir / "llamafactory-demo" / "c4_demo.jsonl")
    assert {detect_format(r) for r in kto} == {MESSAGES}
    assert {detect_format(r) for r in c4} == {TEXT}
    assert all(validate_record(r).messages == r.row["messages"] for r in kto)
    assert validate_record(c4[0]).text == c4[0].row["text"]


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"text": "x"}, TEXT),
        ({"prompt": "a", "completion": "b"}, PROMPT_COMPLETION),
        ({"prompt": [U], "completion": [A]}, PROMPT_COMPLETION),
        ({"messages": [U, A]}, MESSAGES),
        ({"conversations": [U, A], "id": 3}, MESSAGES),
        ({"messages": [U, A], "text": "ignored"}, MESSAGES),
        ({"prompt": "a", "completion": "b", "text": "ab"}, PROMPT_COMPLETION),
        ({"prompt": "only"}, PROMPT_COMPLETION),
    ],
)
def test_detect(row, fmt):
    assert detect_format(row) == fmt


def test_conversations_key_and_conversational_prompt_completion():
    ex = validate_record({"conversations": [S, U, A]})
    assert ex.fmt == MESSAGES and ex.field == "conversations" and ex.messages == [S, U, A] and ex.conversational
    ex = validate_record({"prompt": [S, U], "completion": [A]})
    assert ex.fmt == PROMPT_COMPLETION and ex.conversational and ex.completion == [A]
    assert not validate_record({"prompt": "a", "completion": "b"}).conversational


def test_override():
    row = {"text": "t", "prompt": "p", "completion": "c"}
    assert validate_record(row).fmt == PROMPT_COMPLETION
    assert validate_record(row, fmt=TEXT).text == "t"
    with pytest.raises(DataError, match="field 'messages': missing"):
        validate_record(row, fmt=MESSAGES)
    with pytest.raises(ValueError, match="unknown dataset format 'chatml'"):
        validate_record(row, fmt="chatml")


BAD_ROWS = [
    # (row, fmt override, field named in the error, words in the error)
    ({"txt": "x"}, None, "", ["cannot tell the dataset format", "'txt'"]),
    ({"text": 3}, None, "text", ["must be a string", "number"]),
    ({"text": "  \n"}, None, "text", ["empty"]),
    ({"other": 1}, TEXT, "text", ["missing"]),
    ({"prompt": "p"}, None, "completion", ["missing"]),
    ({"prompt": "", "completion": "c"}, None, "prompt", ["empty"]),
    ({"prompt": "p", "completion": None}, None, "completion", ["string", "null"]),
    ({"prompt": [U], "completion": "c"}, None, "completion", ["list of messages"]),
    ({"prompt": [], "completion": [A]}, None, "prompt", ["empty list"]),
    ({"prompt": [U, A], "completion": [A]}, None, "completion[0].role", ["expected 'user'"]),
    ({"messages": "hi"}, None, "messages", ["must be a list"]),
    ({"messages": []}, None, "messages", ["empty conversation"]),
    ({"messages": [U, "hello"]}, None, "messages[1]", ["expected an object"]),
    ({"messages": [U, {"content": "x"}]}, None, "messages[1].role", ["missing"]),
    ({"messages": [U, {"role": "assistant"}]}, None, "messages[1].content", ["missing"]),
    ({"messages": [U, {"role": "assistant", "content": 5}]}, None, "messages[1].content", ["must be a string"]),
    ({"messages": [U, {"role": "assistant", "content": None}]}, None, "messages[1].content", ["must be a string"]),
    ({"messages": [U, {"role": "assistant", "content": ""}]}, None, "messages[1].content", ["empty"]),
    ({"messages": [U, {"role": "bot", "content": "x"}]}, None, "messages[1].role", ["unknown role 'bot'"]),
    ({"conversations": [{"from": "human", "value": "hi"}]}, MESSAGES, "conversations[0]", ["ShareGPT"]),
    ({"messages": [U]}, None, "messages[0].role", ["must end with an 'assistant'"]),
    ({"messages": [U, A, U]}, None, "messages[2].role", ["must end with an 'assistant'"]),
    ({"messages": [S]}, None, "messages[0].role", ["must end with an 'assistant'"]),
    ({"messages": [A, U, A]}, None, "messages[0].role", ["expected 'user' as the first message"]),
    ({"messages": [U, U, A]}, None, "messages[1].role", ["expected 'assistant' after 'user'", "alternate"]),
    ({"messages": [U, A, A]}, None, "messages[2].role", ["expected 'user' after 'assistant'"]),
    ({"messages": [U, S, A]}, None, "messages[1].role", ["'system'", "first message"]),
    ({"conversations": [U, A, {"role": "user", "content": 1}]}, None, "conversations[2].content", ["string"]),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("row, fmt, field, words", BAD_ROWS)
def test_bad_rows_name_file_row_field(tmp_path, suffix, row, fmt, field, words):
    good = {"text": "fine"} if (fmt or detect_format_safe(row)) == TEXT else {"messages": [U, A]}
    path = tmp_path / f"mydata{suffix}"
    rows = [good, row]
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    rec = load_records(path)[1]
    with pytest.raises(DataError) as e:
        validate_record(rec, fmt)
    msg = str(e.value)
    assert "mydata" + suffix in msg
    assert ("line 2" if suffix == ".jsonl" else "index 1 (0-based)") in msg
    if field:
        assert f"field '{field}'" in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def detect_format_safe(row):
    try:
        return detect_format(row)
    except DataError:
        return None


def test_preference_rows_under_sft_point_to_the_preference_methods():
    row = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    with pytest.raises(DataError, match=r"index 0 .*preference row.*method='dpo' \(CLI: --method dpo\)"):
        detect_format(row)
    with pytest.raises(DataError, match=r"data_format= \(CLI: --data-format; fmt= in pronghorn.data\)"):
        detect_format({"question": "q"})
