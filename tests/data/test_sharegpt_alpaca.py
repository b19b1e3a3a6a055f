"""ShareGPT (from/value, tool calls, tools column) and Alpaca rows: standardization, detection, masks checked
token by token against the chat template's own {% generation %} mask, and errors naming file/row/field."""

from __future__ import annotations

import json
import sys
import types

import pytest

from pronghorn.data import (
    ALPACA,
    IGNORE_INDEX,
    SHAREGPT,
    detect_format,
    load_records,
    standardize_sharegpt,
    tokenize_dataset,
    tokenize_record,
    validate_record,
)
from chat_reference import IM_END, SMOL_GENERATION_TEMPLATE
from pronghorn.errors import DataError


# A Qwen-2.5-like ChatML template that renders the tools schema and tool calls / tool results, with
# {% generation %} markers (the reference mask); TOOLS_TEMPLATE is the same without them.
TOOLS_GENERATION_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}{{ 'You are helpful.' }}{% endif %}"
    "{{ '\\n\\n# Tools\\n<tools>' }}{% for t in tools %}{{ '\\n' + (t | tojson) }}{% endfor %}"
    "{{ '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{ '<|im_start|>user\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- elif m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}{{ m['content'] }}"
    "{%- for tc in (m['tool_calls'] or []) %}{{ '<tool_call>\\n{\"name\": \"' + tc['function']['name'] + "
    "'\", \"arguments\": ' + (tc['function']['arguments'] | tojson) + '}\\n</tool_call>' }}{%- endfor %}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- elif m['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + m['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOOLS_TEMPLATE = TOOLS_GENERATION_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def runs(labels):
    out, cur = [], []
    for i, lab in enumerate(labels):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            out, cur = out + [cur], []
    return out + [cur] if cur else out


def reference(tok, msgs, template, tools=None):
    """(input_ids, 0/1 trained mask) from transformers' own {% generation %} assistant mask."""
    ref = tok.apply_chat_template(msgs, chat_template=template, tools=tools, return_dict=True,
                                  return_assistant_tokens_mask=True)
    return list(ref["input_ids"]), list(ref["assistant_masks"])


def write(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def dummy(data_dir):
    return load_records(data_dir / "fastchat" / "dummy_conversation.json")


@pytest.fixture(scope="module")
def glaive(data_dir):
    return load_records(data_dir / "llamafactory-demo" / "glaive_toolcall_en_demo.json")


# -- ShareGPT ------------------------------------------------------------------------------------------------


def test_standardize_sharegpt_list(dummy, glaive):
    rows = [r.row for r in dummy]
    std = standardize_sharegpt(rows)
    assert len(std) == len(rows) and std[0]["id"] == rows[0]["id"]
    for raw, new in zip(rows, std):
        assert [m["content"] for m in new["conversations"]] == [t["value"] for t in raw["conversations"]]
        assert [m["role"] for m in new["conversations"]] == [
            {"human": "user", "gpt": "assistant"}[t["from"]] for t in raw["conversations"]]
    assert "role" not in rows[0]["conversations"][0]  # the input is not modified
    assert standardize_sharegpt(std) == std  # already standardized rows pass through

    rec = next(r for r in glaive if r.row["conversations"][3]["value"].startswith('{"name": "search_recipes"'))
    conv = standardize_sharegpt([rec.row])[0]["conversations"]
    assert [m["role"] for m in conv][:6] == ["user", "assistant", "user", "assistant", "tool", "assistant"]
    assert conv[3] == {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}}]}
    assert conv[4]["content"] == rec.row["conversations"][4]["value"]


def test_standardize_sharegpt_datasets_dataset(monkeypatch):
    class Dataset:  # the part of datasets.Dataset that standardize_sharegpt uses
        def __init__(self, rows):
            self.rows, self.column_names = rows, list(rows[0])

        def map(self, fn, with_indices=False, desc=None):
            return Dataset([{**r, **fn(r, i)} for i, r in enumerate(self.rows)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(Dataset=Dataset))
    ds = Dataset([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "n": 1}])
    out = standardize_sharegpt(ds)
    assert isinstance(out, Dataset)
    assert out.rows == [{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                         "n": 1}]


def test_detect_sharegpt(dummy, glaive):
    assert {detect_format(r) for r in dummy} == {SHAREGPT}
    assert {detect_format(r) for r in glaive} == {SHAREGPT}
    rec = next(r for r in glaive if r.row["tools"] not in ("", "[]"))
    ex = validate_record(rec)
    assert ex.fmt == SHAREGPT and ex.field == "conversations" and ex.tools == json.loads(rec.row["tools"])
    assert ex.messages == standardize_sharegpt([rec.row])[0]["conversations"]


def test_sharegpt_masks_match_reference(dummy, smollm2_tokenizer):
    tok = smollm2_tokenizer
    outs = tokenize_dataset(dummy, tok, max_length=None, progress=False)
    for rec, out in zip(dummy[:150], outs):
        msgs = standardize_sharegpt([rec.row])[0]["conversations"]
        ids, mask = reference(tok, msgs, SMOL_GENERATION_TEMPLATE)
        assert out["input_ids"] == ids == tok(tok.apply_chat_template(msgs, tokenize=False),
                                               add_special_tokens=False)["input_ids"]
        assert [int(lab != IGNORE_INDEX) for lab in out["labels"]] == mask, rec.where
        decoded = [tok.decode([out["input_ids"][i] for i in run]) for run in runs(out["labels"])]
        assert decoded == [m["content"] + IM_END for m in msgs if m["role"] == "assistant"]
        assert out == tokenize_record({"messages": msgs}, tok, max_length=None)


def test_glaive_tools_with_tool_template(glaive, smollm2_tokenizer):
    tok = smollm2_tokenizer
    outs = tokenize_dataset(glaive, tok, max_length=None, chat_template=TOOLS_TEMPLATE, progress=False)
    n_calls = 0
    for rec, out in zip(glaive, outs):
        msgs = standardize_sharegpt([rec.row])[0]["conversations"]
        tools = json.loads(rec.row["tools"]) if rec.row["tools"] else None
        ids, mask = reference(tok, msgs, TOOLS_GENERATION_TEMPLATE, tools)
        assert out["input_ids"] == ids, rec.where
        assert [int(lab != IGNORE_INDEX) for lab in out["labels"]] == mask, rec.where
        text = tok.decode(out["input_ids"])
        for t in tools or []:
            assert json.dumps(t["name"]) in text  # the tools column reached the template
        trained = [tok.decode([out["input_ids"][i] for i in run]) for run in runs(out["labels"])]
        assistants = [m for m in msgs if m["role"] == "assistant"]
        assert len(trained) == len(assistants)
        for span, m in zip(trained, assistants):
            assert span.endswith(IM_END) and m["content"] in span
            for call in m.get("tool_calls", []):
                n_calls += 1
                assert span.startswith("<tool_call>") and call["function"]["name"] in span
        masked = tok.decode([t for t, lab in zip(out["input_ids"], out["labels"]) if lab == IGNORE_INDEX])
        for m in msgs:
            if m["role"] == "tool":
                assert m["content"] in masked  # tool results are context, never trained
    assert n_calls > 100


def test_glaive_on_smollm2_template(glaive, smollm2_tokenizer):
    """SmolLM2's template ignores `tools` and does not render tool calls: plain rows train as usual (the tools
    argument does not crash anything), rows with a function_call get a clear error naming file/row/field."""
    tok = smollm2_tokenizer
    plain = [r for r in glaive if all(t["from"] in ("human", "gpt") for t in r.row["conversations"])]
    calls = [r for r in glaive if any(t["from"] == "function_call" for t in r.row["conversations"])]
    assert len(plain) > 50 and len(calls) > 50
    for rec in plain[:60]:
        out = tokenize_record(rec, tok, max_length=None)
        msgs = standardize_sharegpt([rec.row])[0]["conversations"]
        ids, mask = reference(tok, msgs, SMOL_GENERATION_TEMPLATE)
        assert out["input_ids"] == ids and [int(lab != IGNORE_INDEX) for lab in out["labels"]] == mask
    rec = calls[0]
    k = next(i for i, t in enumerate(rec.row["conversations"]) if t["from"] == "function_call")
    with pytest.raises(DataError) as e:
        tokenize_record(rec, tok)
    msg = str(e.value)
    for part in ("glaive_toolcall_en_demo.json", f"index {rec.index} (0-based)",
                 f"field 'conversations[{k}].tool_calls'", "does not render tool calls"):
        assert part in msg, msg


def test_tool_role_dropped_by_template_is_an_error(smollm2_tokenizer):
    template = (  # renders tool calls but silently drops tool results
        "{% for m in messages %}{% if m['role'] != 'tool' %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
        "{% for tc in (m['tool_calls'] or []) %}{{ tc['function']['name'] }}{% endfor %}{{ '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": '{"name": "f"}'},
                             {"from": "observation", "value": "result 42"}, {"from": "gpt", "value": "42"}]}
    with pytest.raises(DataError, match=r"field 'conversations\[2\]'.*does not render tool messages"):
        tokenize_record(row, smollm2_tokenizer, chat_template=template)


BAD_SHAREGPT = [
    # (conversation or row, field named, words)
    ([{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}], "conversations[1].from", ["unknown speaker"]),
    ([{"from": "human", "value": "q"}, {"value": "a"}], "conversations[1].from", ["missing"]),
    ([{"from": "human", "value": "q"}, {"from": "gpt"}], "conversations[1].value", ["missing"]),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}], "conversations[1].value", ["empty"]),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": 7}], "conversations[1].value", ["must be a string"]),
    ([{"from": "human", "value": "q"}, "gpt: a"], "conversations[1]", ["expected an object"]),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], "conversations[0].from",
     ["expected 'user' as the first message"]),
    ([{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}], "conversations[1].from",
     ["expected 'assistant' after 'user'"]),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "q2"}],
     "conversations[2].from", ["must end with an 'assistant'"]),
    ([{"from": "human", "value": "q"}, {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}],
     "conversations[1].from", ["expected 'assistant' after 'user', got 'tool'"]),
    ([{"from": "human", "value": "q"}, {"from": "function_call", "value": "not json"}, {"from": "gpt", "value": "a"}],
     "conversations[1].value", ["function_call", "invalid JSON"]),
    ([{"from": "human", "value": "q"}, {"from": "function_call", "value": '{"args": 1}'},
      {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}], "conversations[1].value", ['"name"']),
    ([{"from": "human", "value": "q"}, {"from": "function_call", "value": '{"name": "f"}'},
      {"from": "gpt", "value": "a"}], "conversations[2].from", ["expected 'tool' after 'assistant'"]),
    ([{"from": "human", "value": "q"}, {"from": "function_call", "value": '{"name": "f"}'}],
     "conversations[1].from", ["must end", "tool call"]),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "system", "value": "s"}],
     "conversations[2].from", ["'system'", "first message"]),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[{oops"},
     "tools", ["not valid JSON"]),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "3"},
     "tools", ["list of tool JSON schemas"]),
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("bad, field, words", BAD_SHAREGPT)
def test_bad_sharegpt_rows_name_file_row_field(tmp_path, suffix, bad, field, words):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    row = bad if isinstance(bad, dict) else {"conversations": bad}
    path = write(tmp_path, "share" + suffix, [good, row])
    recs = load_records(path)
    assert detect_format(recs[1]) == SHAREGPT or not isinstance(row["conversations"][0], dict)
    with pytest.raises(DataError) as e:
        validate_record(recs[1], SHAREGPT)
    msg = str(e.value)
    assert "share" + suffix in msg and ("line 2" if suffix == ".jsonl" else "index 1 (0-based)") in msg
    assert f"field '{field}'" in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_messages_rows_with_tool_calls_and_tools_column(smollm2_tokenizer):
    """TRL's tool-calling layout (role/content messages, tool_calls, a tools list) works directly too."""
    tok = smollm2_tokenizer
    tools = [{"type": "function", "function": {"name": "get_time", "description": "Time now",
                                               "parameters": {"type": "object", "properties": {}}}}]
    msgs = [{"role": "user", "content": "Time?"},
            {"role": "assistant", "tool_calls": [{"type": "function",
                                                  "function": {"name": "get_time", "arguments": {}}}]},
            {"role": "tool", "content": "12:00"},
            {"role": "assistant", "content": "It is noon."}]
    out = tokenize_record({"messages": msgs, "tools": tools}, tok, chat_template=TOOLS_TEMPLATE)
    msgs[1]["content"] = ""  # the {% generation %} reference template concatenates content
    ids, mask = reference(tok, msgs, TOOLS_GENERATION_TEMPLATE, tools)
    assert out["input_ids"] == ids and [int(lab != IGNORE_INDEX) for lab in out["labels"]] == mask
    with pytest.raises(DataError, match=r"field 'messages\[1\]\.tool_calls\[0\]\.function\.name': missing"):
        validate_record({"messages": [msgs[0], {"role": "assistant", "tool_calls": [{"function": {}}]}, *msgs[2:]]})
    with pytest.raises(DataError, match=r"field 'messages\[0\]\.tool_calls'.*only assistant"):
        validate_record({"messages": [{**msgs[0], "tool_calls": msgs[1]["tool_calls"]}, *msgs[1:]]})


# -- Alpaca --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alpaca(data_dir):
    return load_records(data_dir / "llamafactory-demo" / "alpaca_en_demo.json")


def test_alpaca_detect_and_messages(alpaca):
    assert {detect_format(r) for r in alpaca} == {ALPACA}
    with_input = next(r for r in alpaca if r.row["input"])
    ex = validate_record(with_input)
    assert ex.fmt == ALPACA and ex.conversational
    assert ex.prompt == [{"role": "user", "content": with_input.row["instruction"] + "\n\n" + with_input.row["input"]}]
    assert ex.completion == [{"role": "assistant", "content": with_input.row["output"]}]
    no_input = next(r for r in alpaca if not r.row["input"])
    assert validate_record(no_input).prompt[0]["content"] == no_input.row["instruction"]
    assert validate_record({"instruction": "i", "output": "o"}).prompt[0]["content"] == "i"  # input optional
    ex = validate_record({"instruction": "i", "input": "x", "output": "o", "system": "Be brief."})
    assert ex.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "i\n\nx"}]


def test_alpaca_only_output_trained(alpaca, smollm2_tokenizer):
    tok = smollm2_tokenizer
    recs = alpaca[:150]
    outs = tokenize_dataset(recs, tok, max_length=None, progress=False)
    for rec, out in zip(recs, outs):
        r = rec.row
        user = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
        ids, mask = reference(tok, msgs, SMOL_GENERATION_TEMPLATE)
        assert out["input_ids"] == ids, rec.where
        assert [int(lab != IGNORE_INDEX) for lab in out["labels"]] == mask, rec.where
        (run,) = runs(out["labels"])
        assert tok.decode([out["input_ids"][i] for i in run]) == r["output"] + IM_END
        assert out == tokenize_record({"prompt": msgs[:1], "completion": msgs[1:]}, tok, max_length=None)


BAD_ALPACA = [
    ({"input": "x", "output": "o"}, "instruction", ["missing"]),
    ({"instruction": "i", "input": "x"}, "output", ["missing"]),
    ({"instruction": "  ", "output": "o"}, "instruction", ["empty"]),
    ({"instruction": "i", "output": ""}, "output", ["empty"]),
    ({"instruction": "i", "output": ["o"]}, "output", ["must be a string", "list"]),
    ({"instruction": "i", "input": 3, "output": "o"}, "input", ["must be a string"]),
    ({"instruction": "i", "output": "o", "system": 1}, "system", ["must be a string"]),
]


@pytest.mark.parametrize("row, field, words", BAD_ALPACA)
def test_bad_alpaca_rows_name_file_row_field(tmp_path, smollm2_tokenizer, row, field, words):
    path = write(tmp_path, "alpaca.jsonl", [{"instruction": "i", "input": "", "output": "o"}, row])
    recs = load_records(path)
    with pytest.raises(DataError) as e:
        tokenize_dataset(recs, smollm2_tokenizer, fmt=ALPACA, progress=False)
    msg = str(e.value)
    assert "alpaca.jsonl line 2" in msg and f"field '{field}'" in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_alpaca_truncation_error_names_output(smollm2_tokenizer):
    row = {"instruction": "word " * 40, "input": "", "output": "answer"}
    with pytest.raises(DataError, match=r"field 'output': no trainable token after truncation to 16"):
        tokenize_record(row, smollm2_tokenizer, max_length=16)
