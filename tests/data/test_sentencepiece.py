"""Every dataset format on a real SentencePiece tokenizer: a BPE model trained in the test with the
``sentencepiece`` package (byte fallback, identity normalisation), loaded as a Hugging Face fast tokenizer
from its ``tokenizer.model``. Text rows must equal sentencepiece's own encoding; for chat rows (whose
rendering holds special tokens, after which the HF tokenizer adds no "▁" prefix) the ids must equal the
tokenizer's encoding of the rendered text, and the trained tokens must decode to exactly the assistant turns
(each ending in ``</s>``), with every other token masked."""

from __future__ import annotations

import io
import json

import pytest

from pronghorn.data import (
    IGNORE_INDEX,
    load_records,
    oasst_conversations,
    tokenize_dataset,
    validate_record,
)
from chat_reference import trained_runs

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

TEMPLATE = (  # a plain tagged template (tools, tool calls and tool results included); BOS from the template
    "{{ bos_token }}{% if tools %}{{ '[TOOLS] ' + (tools | tojson) + '\\n' }}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '[ASSISTANT] ' + (m['content'] or '') }}"
    "{% for c in m['tool_calls'] or [] %}{{ '[CALL] ' + c['function']['name'] + ' ' + (c['function']['arguments'] "
    "| tojson) }}{% endfor %}{{ eos_token + '\\n' }}{% else %}{{ '[' + (m['role'] | upper) + '] ' + m['content'] "
    "+ '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '[ASSISTANT] ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def sp(data_dir, tmp_path_factory):
    """(HF fast tokenizer, sentencepiece processor) of one tiny SentencePiece BPE model."""
    alpaca = json.loads((data_dir / "llamafactory-demo" / "alpaca_en_demo.json").read_text())[:150]
    corpus = [r["instruction"] + "\n" + r["output"] for r in alpaca]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=500, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2,
    )
    d = tmp_path_factory.mktemp("sentencepiece")
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "legacy": False, "add_bos_token": True, "add_eos_token": False, "chat_template": TEMPLATE,
    }))
    tok = transformers.AutoTokenizer.from_pretrained(d)
    assert tok.is_fast and len(tok) == 500
    return tok, spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))


def _assistant_text(m):
    calls = "".join(f"[CALL] {c['function']['name']} {json.dumps(c['function']['arguments'], ensure_ascii=False)}"
                    for c in m.get("tool_calls") or [])
    return (m["content"] or "") + calls + "</s>"


def _check_chat(records, fmt, tok, sp_model):
    out = tokenize_dataset(records, tok, fmt=fmt, max_length=None, progress=False)
    assert len(out) == len(records)
    for rec, ex in zip(records, out):
        v = validate_record(rec, fmt)
        messages = v.messages if v.messages is not None else v.prompt + v.completion
        full = tok.apply_chat_template(messages, tools=v.tools, tokenize=False)
        assert ex["input_ids"] == tok(full, add_special_tokens=False)["input_ids"] and ex["input_ids"][0] == 1
        for t, lab in enumerate(ex["labels"]):
            assert lab in (IGNORE_INDEX, ex["input_ids"][t])
        first = 0 if v.messages is not None else len(v.prompt)
        expected = [_assistant_text(m) for m in messages[first:] if m["role"] == "assistant"]
        decoded = [tok.decode([ex["input_ids"][t] for t in run]).strip() for run in trained_runs(ex["labels"])]
        assert decoded == [e.strip() for e in expected]


def test_text_rows(data_dir, sp):
    tok, sp_model = sp
    records = load_records(data_dir / "llamafactory-demo" / "c4_demo.jsonl")[:5]
    for rec, ex in zip(records, tokenize_dataset(records, tok, max_length=None, progress=False)):
        assert ex["input_ids"] == [1] + sp_model.encode(rec.row["text"]) + [2] and ex["labels"] == ex["input_ids"]


def test_alpaca(data_dir, sp):
    _check_chat(load_records(data_dir / "llamafactory-demo" / "alpaca_en_demo.json")[:20], "alpaca", *sp)


def test_sharegpt_and_messages(data_dir, sp):
    _check_chat(load_records(data_dir / "fastchat" / "dummy_conversation.json")[:10], "sharegpt", *sp)
    _check_chat(load_records(data_dir / "llamafactory-demo" / "kto_en_demo.json")[:10], "messages", *sp)


def test_sharegpt_with_tools(data_dir, sp):
    _check_chat(load_records(data_dir / "llamafactory-demo" / "glaive_toolcall_en_demo.json")[:10], "sharegpt", *sp)


def test_oasst_trees(data_dir, sp):
    trees = load_records(data_dir / "oasst" / "en_100_tree.jsonl")[:4]
    _check_chat(oasst_conversations(trees), "messages", *sp)
