"""Preference / KTO rows on the real files in /work/shared/data (hh-rlhf, LLaMA-Factory dpo / kto, OpenAssistant),
tokenized with SmolLM2's tokenizer and ChatML template; bad rows; truncation; the concatenated batch."""

from __future__ import annotations

import gzip
import json

import pytest

from pronghorn.data.convert import SHAREGPT_ROLES
from pronghorn.data.preference import (
    kto_examples,
    load_preference_records,
    preference_pairs,
    tokenize_kto,
    tokenize_preference,
)
from pronghorn.data.preference_collate import add_kl_completions, collate_kto, collate_preference
from pronghorn.errors import DataError

HH = "hh-rlhf/harmless-base-test.jsonl.gz"


@pytest.fixture(scope="module")
def hh(data_dir):
    return load_preference_records(data_dir / HH)


def test_hh_rlhf_bad_rows_are_reported_by_line_then_skipped_when_asked(hh, data_dir):
    assert len(hh) == 2312
    with pytest.raises(DataError) as e:
        preference_pairs(hh)
    msg = str(e.value)
    assert msg.startswith("13 bad rows")
    assert f"{data_dir / HH} line 87: field 'chosen': empty completion" in msg  # "Assistant: " with no reply
    assert "line 668: field 'chosen[4].role'" in msg  # two Assistant turns in a row
    with pytest.warns(UserWarning, match="skipped 13 bad rows"):
        pairs = preference_pairs(hh, skip_bad_rows=True)
    assert len(pairs) == 2299 and len(pairs.skipped) == 13


def test_hh_rlhf_prompt_is_the_shared_transcript(hh, smollm2_tokenizer):
    raw = hh[0].row
    pair = preference_pairs(hh[:1])[0]
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert pair.prompt[0]["content"] == "what are some pranks with a pen i can do?"
    head, _, last = raw["chosen"].rpartition("\n\nAssistant: ")
    assert pair.chosen == [{"role": "assistant", "content": last}]
    assert raw["rejected"].startswith(head)
    (row,) = tokenize_preference([pair], smollm2_tokenizer, max_length=None)
    tok = smollm2_tokenizer
    prompt_text = tok.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(pair.prompt + pair.chosen, tokenize=False)
    assert tok.decode(row["prompt_ids"]) == prompt_text
    assert tok.decode(row["prompt_ids"] + row["chosen_ids"]) == full
    # trained: the reply through <|im_end|>; the template's trailing newline is not
    end = row["chosen_mask"].index(0)
    assert tok.convert_ids_to_tokens(row["chosen_ids"][end - 1]) == "<|im_end|>"
    assert row["chosen_mask"][end:] == [0] * (len(row["chosen_ids"]) - end)
    assert row["rejected_mask"][0] == 1


def test_sharegpt_preference_file(data_dir, smollm2_tokenizer):
    recs = load_preference_records(data_dir / "llamafactory-demo/dpo_en_demo.json")
    pairs = preference_pairs(recs)
    assert len(pairs) == 300
    raw = recs[0].row
    assert pairs[0].prompt == [{"role": "user", "content": raw["conversations"][0]["value"]}]
    assert pairs[0].chosen == [{"role": "assistant", "content": raw["chosen"]["value"]}]
    assert pairs[0].rejected == [{"role": "assistant", "content": raw["rejected"]["value"]}]
    i = next(i for i, r in enumerate(recs) if len(r.row["conversations"]) >= 3)
    conv = recs[i].row["conversations"]
    assert [m["content"] for m in pairs[i].prompt] == [c["value"] for c in conv]
    assert [m["role"] for m in pairs[i].prompt] == [SHAREGPT_ROLES[c["from"]] for c in conv]


def test_openassistant_ranked_siblings(data_dir):
    recs = load_preference_records(data_dir / "oasst/en_100_tree.jsonl")
    pairs = preference_pairs(recs)
    assert len(pairs) == 754  # every pair of differently ranked sibling replies
    root = recs[0].row["prompt"]
    first = pairs[[p.record.index for p in pairs].index(recs[0].index)]
    ranks = {r["text"]: r["rank"] for r in root["replies"]}
    top = [p for p in pairs if p.record is first.record and p.prompt == [{"role": "user", "content": root["text"]}]]
    assert top and all(ranks[p.chosen[0]["content"]] < ranks[p.rejected[0]["content"]] for p in top)
    assert first.chosen_field.startswith("prompt.") and first.chosen_field.endswith(".text")


def test_kto_file(data_dir, smollm2_tokenizer):
    recs = load_preference_records(data_dir / "llamafactory-demo/kto_en_demo.json")
    ex = kto_examples(recs)
    assert len(ex) == 300 and sum(e.label for e in ex) == 150
    assert ex[0].completion == recs[0].row["messages"][-1:] and ex[0].prompt == recs[0].row["messages"][:-1]
    with pytest.warns(UserWarning, match="prompt longer than max_length"):
        rows = tokenize_kto(ex[:6], smollm2_tokenizer, max_length=256, skip_bad_rows=True)
    assert 0 < len(rows) < 6 and len(rows) + len(rows.skipped) == 6
    assert all(isinstance(r["label"], bool) and any(r["completion_mask"]) for r in rows)
    rows = add_kl_completions(rows, batch_size=len(rows))
    batch, kl = collate_kto(rows, 0)
    assert rows[0]["kl_completion_ids"] == rows[-1]["completion_ids"]  # TRL's rotation by one
    assert batch["input_ids"].shape[0] == kl["input_ids"].shape[0] == len(rows)


def test_standard_and_implicit_prompt_rows(smollm2_tokenizer):
    rows = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
            {"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
             "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}]}]
    p = preference_pairs(rows)
    assert (p[0].prompt, p[0].chosen) == ("The sky is", " blue.")
    assert (p[1].prompt, p[1].chosen, p[1].rejected) == ("The sky is", " blue.", " green.")
    assert p[2].prompt == [{"role": "user", "content": "Sky?"}] and p[2].chosen[0]["content"] == "Blue."
    trl_utils = pytest.importorskip("trl.data_utils")  # the implicit prompt is TRL's extract_prompt
    for row, pair in zip(rows[1:], p[1:]):
        want = trl_utils.extract_prompt(row)
        assert (want["prompt"], want["chosen"], want["rejected"]) == (pair.prompt, pair.chosen, pair.rejected)
    tok = smollm2_tokenizer
    out = tokenize_preference(p[:1], tok, max_length=64)
    assert out[0]["chosen_ids"][-1] == tok.eos_token_id and all(out[0]["chosen_mask"])
    assert tok.decode(out[0]["prompt_ids"] + out[0]["chosen_ids"]) == "The sky is blue." + tok.eos_token


def test_bad_rows_named_and_skipped_only_when_asked(smollm2_tokenizer):
    rows = [{"prompt": "Q", "chosen": "A", "rejected": "A"},
            {"prompt": "Q", "chosen": " ", "rejected": "B"},
            {"prompt": "Q", "chosen": "A", "rejected": "B"},
            {"chosen": "same", "rejected": "same"}]
    with pytest.raises(DataError) as e:
        preference_pairs(rows, source="prefs.json")
    msg = str(e.value)
    assert "prefs.json index 0 (0-based): field 'chosen': chosen == rejected" in msg
    assert "prefs.json index 1 (0-based): field 'chosen': empty completion" in msg
    assert "prefs.json index 3 (0-based): field 'chosen': empty completion" in msg  # nothing left after the prefix
    with pytest.warns(UserWarning, match="skipped 3 bad rows"):
        ok = preference_pairs(rows, skip_bad_rows=True, source="prefs.json")
    assert len(ok) == 1 and len(ok.skipped) == 3
    long_prompt = [{"prompt": "word " * 80, "chosen": "yes", "rejected": "no"}, rows[2]]
    with pytest.raises(DataError, match=r"index 0 \(0-based\): field 'prompt': prompt longer than max_length"):
        tokenize_preference(long_prompt, smollm2_tokenizer, max_length=32)
    with pytest.warns(UserWarning):
        out = tokenize_preference(long_prompt, smollm2_tokenizer, max_length=32, skip_bad_rows=True)
    assert len(out) == 1 and len(out.skipped) == 1


def test_truncation_keeps_prompt_end_and_completion_start(smollm2_tokenizer):
    tok = smollm2_tokenizer
    row = {"prompt": " ".join(f"p{i}" for i in range(40)), "chosen": " " + " ".join(f"c{i}" for i in range(40)),
           "rejected": " " + " ".join(f"r{i}" for i in range(40))}
    full = tokenize_preference([row], tok, max_length=None)[0]
    (cut,) = tokenize_preference([row], tok, max_length=30, max_prompt_length=10)
    assert cut["prompt_ids"] == full["prompt_ids"][-10:]
    assert cut["chosen_ids"] == full["chosen_ids"][:20] and cut["rejected_ids"] == full["rejected_ids"][:20]
    assert len(cut["chosen_mask"]) == 20


def test_concatenated_batch_chosen_then_rejected():
    rows = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "chosen_mask": [1, 1, 0], "rejected_ids": [10],
             "rejected_mask": [1]},
            {"prompt_ids": [11], "chosen_ids": [12], "chosen_mask": [1], "rejected_ids": [13, 14],
             "rejected_mask": [1, 1]}]
    b = collate_preference(rows, pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [11, 12, 0, 0, 0], [5, 6, 10, 0, 0], [11, 13, 14, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 7, 8, -100], [-100, 12, -100, -100, -100],
                                    [-100, -100, 10, -100, -100], [-100, 13, 14, -100, -100]]
    assert b["attention_mask"].sum(-1).tolist() == [5, 2, 3, 3]


def test_gzip_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"chosen": "a", "rejected": "b"}\nnot json\n'))
    with pytest.raises(DataError, match="p.jsonl.gz line 2: invalid JSON"):
        load_preference_records(path)
    path.write_bytes(gzip.compress(json.dumps({"chosen": "x"}).encode()))
    with pytest.raises(DataError, match="line 1: field 'rejected': missing"):
        preference_pairs(load_preference_records(path))


def test_kto_bad_rows_named_and_skipped_only_when_asked(smollm2_tokenizer):
    rows = [{"prompt": "Q", "completion": " ", "label": True},
            {"prompt": "Q", "completion": "A", "label": "yes"},
            {"prompt": "Q", "completion": "A"},
            {"prompt": "Q", "completion": "A", "label": False}]
    with pytest.raises(DataError) as e:
        kto_examples(rows, source="kto.json")
    msg = str(e.value)
    assert msg.startswith("3 bad rows") and "pass skip_bad_rows=True (CLI: --skip-bad-rows) to drop them" in msg
    assert "kto.json index 0 (0-based): field 'completion': empty completion" in msg
    assert "kto.json index 1 (0-based): field 'label': must be true or false, got 'yes'" in msg
    assert "kto.json index 2 (0-based): field 'label': missing" in msg
    with pytest.warns(UserWarning, match="skipped 3 bad rows"):
        ok = kto_examples(rows, skip_bad_rows=True, source="kto.json")
    assert len(ok) == 1 and len(ok.skipped) == 3
    long_prompt = [{"prompt": "word " * 80, "completion": "yes", "label": True}, rows[3]]
    with pytest.raises(DataError, match=r"index 0 \(0-based\): field 'prompt': prompt longer than max_length"):
        tokenize_kto(long_prompt, smollm2_tokenizer, max_length=32)
    with pytest.warns(UserWarning, match="skipped 1 rows at tokenization"):
        out = tokenize_kto(long_prompt, smollm2_tokenizer, max_length=32, skip_bad_rows=True)
    assert len(out) == 1 and out[0]["label"] is False and len(out.skipped) == 1


def test_pair_equal_only_after_truncation_is_bad(smollm2_tokenizer):
    """Completions that differ only past max_length train nothing: reported as chosen == rejected."""
    rows = [{"prompt": "Q", "chosen": " same start then yes", "rejected": " same start then no"},
            {"prompt": "Q", "chosen": " A", "rejected": " B"}]
    with pytest.raises(DataError, match=r"index 0 \(0-based\): field 'chosen': chosen == rejected after "
                                        r"tokenization and truncation to 4 tokens"):
        tokenize_preference(rows, smollm2_tokenizer, max_length=4)
    with pytest.warns(UserWarning, match="skipped 1 rows at tokenization"):
        out = tokenize_preference(rows, smollm2_tokenizer, max_length=4, skip_bad_rows=True)
    assert len(out) == 1 and len(out.skipped) == 1
    assert len(tokenize_preference(rows, smollm2_tokenizer, max_length=None)) == 2
