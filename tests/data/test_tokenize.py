"""tokenize_record / tokenize_dataset against independent references, on real data and the real SmolLM2
tokenizer (ChatML, EOS = <|im_end|>), plus a tiny Llama-2-style SentencePiece-like tokenizer."""

from __future__ import annotations

import json

import pytest

from pronghorn.data import (
    IGNORE_INDEX,
    load_records,
    records_from_rows,
    tokenize_dataset,
    tokenize_record,
)
from chat_reference import IM_END, SMOL_GENERATION_TEMPLATE, trained_runs
from pronghorn.errors import DataError


def _check_trained_equal_ids(out):
    assert len(out["input_ids"]) == len(out["labels"])
    for tok, lab in zip(out["input_ids"], out["labels"]):
        assert lab in (IGNORE_INDEX, tok)


@pytest.fixture(scope="module")
def kto(data_dir):
    return load_records(data_dir / "llamafactory-demo" / "kto_en_demo.json")


# -- messages -------------------------------------------------------------------------------------------


def test_messages_all_assistant_matches_plain_reference(kto, smollm2_tokenizer):
    tok = smollm2_tokenizer
    outs = tokenize_dataset(kto, tok, max_length=None, progress=False)
    assert len(outs) == len(kto)
    for rec, out in zip(kto, outs):
        msgs = rec.row["messages"]
        full = tok.apply_chat_template(msgs, tokenize=False)
        assert out["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
        _check_trained_equal_ids(out)
        runs = trained_runs(out["labels"])
        assistants = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert len(runs) == len(assistants), rec.where
        for run, content in zip(runs, assistants):
            assert tok.decode([out["input_ids"][i] for i in run]) == content + IM_END, rec.where
            # the newline after <|im_end|> and the next turn's header stay masked
            assert out["input_ids"][run[-1]] == tok.eos_token_id


def test_messages_mask_equals_transformers_generation_mask(kto, smollm2_tokenizer):
    tok = smollm2_tokenizer
    for rec in kto[:120]:
        msgs = rec.row["messages"]
        assert tok.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(
            msgs, tokenize=False, chat_template=SMOL_GENERATION_TEMPLATE
        )
        ref = tok.apply_chat_template(
            msgs, chat_template=SMOL_GENERATION_TEMPLATE, return_dict=True, return_assistant_tokens_mask=True
        )
        out = tokenize_record(rec, tok, max_length=None)
        assert out["input_ids"] == list(ref["input_ids"])
        assert [int(lab != IGNORE_INDEX) for lab in out["labels"]] == list(ref["assistant_masks"]), rec.where


def test_messages_last_assistant(kto, smollm2_tokenizer):
    rec = next(r for r in kto if len(r.row["messages"]) >= 6)
    out = tokenize_record(rec, smollm2_tokenizer, max_length=None, train_on="last_assistant")
    (run,) = trained_runs(out["labels"])
    assert smollm2_tokenizer.decode([out["input_ids"][i] for i in run]) == rec.row["messages"][-1]["content"] + IM_END
    assert run[-1] == len(out["input_ids"]) - 2  # only the final "\n" follows


def test_system_message_and_conversations_key(smollm2_tokenizer):
    msgs = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome"},
    ]
    a = tokenize_record({"messages": msgs}, smollm2_tokenizer)
    b = tokenize_record({"conversations": msgs}, smollm2_tokenizer)
    assert a == b
    runs = trained_runs(a["labels"])
    decoded = [smollm2_tokenizer.decode([a["input_ids"][i] for i in r]) for r in runs]
    assert decoded == ["Paris" + IM_END, "Rome" + IM_END]
    assert "helpful AI assistant" not in smollm2_tokenizer.decode(a["input_ids"])  # own system replaces default


def test_conversational_prompt_completion_trains_completion_only(kto, smollm2_tokenizer):
    tok = smollm2_tokenizer
    for rec in kto[:60]:
        msgs = rec.row["messages"]
        row = {"prompt": msgs[:-1], "completion": msgs[-1:]}
        out = tokenize_record(row, tok, max_length=None)
        assert out == tokenize_record(rec, tok, max_length=None, train_on="last_assistant")


def test_truncation_keeps_start_and_partial_assistant(kto, smollm2_tokenizer):
    rec = next(r for r in kto if len(r.row["messages"]) >= 4)
    full = tokenize_record(rec, smollm2_tokenizer, max_length=None)
    first = next(i for i, lab in enumerate(full["labels"]) if lab != IGNORE_INDEX)
    cut = tokenize_record(rec, smollm2_tokenizer, max_length=first + 3)
    assert cut["input_ids"] == full["input_ids"][: first + 3]
    assert cut["labels"] == full["labels"][: first + 3]


def test_truncation_leaving_nothing_trained_names_file_row_field(kto, smollm2_tokenizer):
    rec = kto[7]
    with pytest.raises(DataError) as e:
        tokenize_record(rec, smollm2_tokenizer, max_length=20)
    msg = str(e.value)
    for part in ("kto_en_demo.json", "index 7 (0-based)", "field 'messages'",
                 "no trainable token after truncation to 20 tokens"):
        assert part in msg, msg


def test_template_that_rewrites_history_is_refused(smollm2_tokenizer, tmp_path):
    # renders only the last two messages: prefixes are then not prefixes of the full rendering
    template = (
        "{% for m in messages[-2:] %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    path = tmp_path / "chat.jsonl"
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    path.write_text(json.dumps(row) + "\n")
    (rec,) = load_records(path)
    with pytest.raises(DataError) as e:
        tokenize_record(rec, smollm2_tokenizer, chat_template=template)
    msg = str(e.value)
    for part in ("chat.jsonl line 1", "field 'messages[1]'", "not a prefix"):
        assert part in msg, msg


def test_template_exception_becomes_data_error(smollm2_tokenizer):
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match=r"<row> index 0 \(0-based\): field 'messages'.*System role not supported"):
        tokenize_record(row, smollm2_tokenizer, chat_template=template)


def test_missing_chat_template_and_bad_options(smollm2_tokenizer):
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        tokenize_record({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
                        NoTemplate())
    with pytest.raises(ValueError, match="train_on"):
        tokenize_record({"text": "x"}, smollm2_tokenizer, train_on="everything")


# -- text -----------------------------------------------------------------------------------------------


def test_text_all_tokens_trained_eos_appended(data_dir, smollm2_tokenizer):
    tok = smollm2_tokenizer
    recs = load_records(data_dir / "llamafactory-demo" / "c4_demo.jsonl")[:50]
    outs = tokenize_dataset(recs, tok, max_length=None, progress=False)
    for rec, out in zip(recs, outs):
        assert out["input_ids"] == tok(rec.row["text"])["input_ids"] + [tok.eos_token_id]
        assert out["labels"] == out["input_ids"]
    cut = tokenize_dataset(recs, tok, max_length=64, progress=False)
    for full, short in zip(outs, cut):
        assert short["input_ids"] == full["input_ids"][:64] and short["labels"] == full["labels"][:64]


def test_text_already_ending_in_eos_not_doubled(smollm2_tokenizer):
    out = tokenize_record({"text": "The end." + IM_END}, smollm2_tokenizer)
    assert out["input_ids"].count(smollm2_tokenizer.eos_token_id) == 1


# -- prompt / completion strings -------------------------------------------------------------------------


def test_prompt_completion_gsm8k(data_dir, smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:40]]
    pc = [{"prompt": f"Question: {r['question']}\nAnswer:", "completion": " " + r["answer"]} for r in rows]
    outs = tokenize_dataset(records_from_rows(pc, source="gsm8k-pc"), tok, progress=True)
    for row, out in zip(pc, outs):
        _check_trained_equal_ids(out)
        (run,) = trained_runs(out["labels"])
        ids = out["input_ids"]
        assert run[-1] == len(ids) - 1 and ids[-1] == tok.eos_token_id
        assert tok.decode(ids[: run[0]]) == row["prompt"]
        assert tok.decode(ids[run[0]:]) == row["completion"] + IM_END
        assert ids == tok(row["prompt"] + row["completion"])["input_ids"] + [tok.eos_token_id]


def test_prompt_completion_truncation_error(smollm2_tokenizer, tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "completion": " fine"}) + "\n\n"
                    + json.dumps({"prompt": "word " * 50, "completion": " answer"}) + "\n")
    recs = load_records(path)
    with pytest.raises(DataError) as e:
        tokenize_dataset(recs, smollm2_tokenizer, max_length=16, progress=False)
    msg = str(e.value)
    for part in ("pc.jsonl line 3", "field 'completion'", "no trainable token after truncation to 16 tokens"):
        assert part in msg, msg


def test_dataset_collects_bad_rows_and_uses_first_row_format(smollm2_tokenizer, tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [{"text": "good"}, {"prompt": "p", "completion": "c"}, {"text": ""}, {"text": "also good"}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(DataError) as e:
        tokenize_dataset(load_records(path), smollm2_tokenizer, progress=False)
    msg = str(e.value)
    assert msg.startswith("2 bad rows")
    assert "mixed.jsonl line 2: field 'text': missing" in msg
    assert "mixed.jsonl line 3: field 'text': is empty" in msg
    # an explicit format override applies to every row
    rows = [{"prompt": "p", "completion": " c", "text": "whole text"}] * 2
    by_default = tokenize_dataset(rows, smollm2_tokenizer, progress=False)
    as_text = tokenize_dataset(rows, smollm2_tokenizer, fmt="text", progress=False)
    assert by_default[0]["labels"][0] == IGNORE_INDEX
    assert as_text[1]["input_ids"] == smollm2_tokenizer("whole text")["input_ids"] + [smollm2_tokenizer.eos_token_id]
    with pytest.raises(DataError, match="is empty"):
        tokenize_dataset([], smollm2_tokenizer, progress=False)


# -- a tiny Llama-2-style tokenizer (byte-fallback BPE on "▁" pieces, <s>/</s>, [INST] template) ----------

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def llama2_tokenizer():
    """Laid out like HF's Llama-2 fast tokenizer: Prepend/Replace "▁" normalizer, no pre-tokenizer, BPE with
    byte fallback (<0x00>..<0xFF> in the vocab), <s> added by the post-processor. The merges are learnt with a
    Metaspace split so that, as in SentencePiece, no piece spans a space."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    corpus = ["The quick brown fox jumps over the lazy dog.", "What is two plus two? It is four.",
              "Hello there, how are you today? I am fine, thank you."] * 20
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    learner.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=LLAMA2_TEMPLATE
    )


def test_llama2_style_messages(llama2_tokenizer):
    tok = llama2_tokenizer
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "It is four."},
        {"role": "user", "content": "How are you today?"},
        {"role": "assistant", "content": "I am fine, thank you. ünïcödé"},
    ]
    out = tokenize_record({"messages": msgs}, tok)
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert full.startswith("<s>[INST] <<SYS>>") and full.endswith(" </s>")
    assert out["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    assert out["input_ids"].count(tok.bos_token_id) == 2  # from the template only, none added on top
    _check_trained_equal_ids(out)
    runs = trained_runs(out["labels"])
    decoded = [tok.decode([out["input_ids"][i] for i in r]).strip() for r in runs]
    assert decoded == ["It is four. </s>", "I am fine, thank you. ünïcödé </s>"]
    # everything masked decodes to the prompt side: [INST] blocks only
    masked = [t for t, lab in zip(out["input_ids"], out["labels"]) if lab == IGNORE_INDEX]
    assert "four" not in tok.decode(masked) and tok.eos_token_id not in masked


def test_llama2_style_text_and_prompt_completion(llama2_tokenizer):
    tok = llama2_tokenizer
    text = tokenize_record({"text": "Hello there"}, tok)
    assert text["input_ids"][0] == tok.bos_token_id and text["input_ids"][-1] == tok.eos_token_id
    pc = tokenize_record({"prompt": "What is two plus two?", "completion": " It is four."}, tok)
    ids, labels = pc["input_ids"], pc["labels"]
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    (run,) = trained_runs(labels)
    assert tok.decode([ids[i] for i in run]).strip() == "It is four.</s>"
