"""OpenAssistant trees: root-to-leaf conversations (all leaves / top-ranked replies), detection, masks checked
token by token against the template's {% generation %} mask, and malformed nodes named by file/row/field."""

from __future__ import annotations

import json

import pytest

from pronghorn.data import (
    IGNORE_INDEX,
    MESSAGES,
    OASST,
    PROMPT_COMPLETION,
    detect_format,
    load_records,
    oasst_conversations,
    tokenize_dataset,
    tokenize_record,
    validate_record,
)
from chat_reference import SMOL_GENERATION_TEMPLATE
from pronghorn.errors import DataError


def reference(tok, msgs, template):
    ref = tok.apply_chat_template(msgs, chat_template=template, return_dict=True, return_assistant_tokens_mask=True)
    return list(ref["input_ids"]), list(ref["assistant_masks"])


@pytest.fixture(scope="module")
def trees(data_dir):
    return load_records(data_dir / "oasst" / "en_100_tree.jsonl")


def paths(node, best_only, prefix=()):
    """Plain reference: every root-to-leaf list of (role, text), trailing prompter turns dropped."""
    here = prefix + ((node["role"], node["text"]),)
    replies = [r for r in node["replies"] if not r.get("deleted")]
    if best_only and node["role"] == "prompter" and len(replies) > 1:
        ranked = [r for r in replies if r.get("rank") is not None]
        replies = [min(ranked, key=lambda r: r["rank"])] if ranked else replies[:1]
    if not replies:
        while here and here[-1][0] == "prompter":
            here = here[:-1]
        return [here] if here else []
    return [p for r in replies for p in paths(r, best_only, here)]


@pytest.mark.parametrize("best_only", [True, False])
def test_conversations_match_reference(trees, best_only):
    convs = oasst_conversations(trees, best_only=best_only)
    expected = []
    for t in trees:
        for p in dict.fromkeys(paths(t.row["prompt"], best_only)):
            expected.append((t.index, [{"role": {"prompter": "user", "assistant": "assistant"}[r], "content": x}
                                       for r, x in p]))
    assert [(c.index, c.row["messages"]) for c in convs] == expected
    assert all(c.source.endswith("en_100_tree.jsonl") and c.kind == "line" for c in convs)
    assert all(detect_format(c) == MESSAGES and c.row["messages"][-1]["role"] == "assistant" for c in convs)
    if best_only:
        n_branches = 0
        for c in convs:  # every assistant message followed is the rank-0 reply of its branch
            node = next(t for t in trees if t.index == c.index).row["prompt"]
            for p in c.row["path"][1:]:
                siblings = [r for r in node["replies"] if not r.get("deleted")]
                node = node["replies"][int(p.removesuffix(".text").rsplit("[", 1)[1][:-1])]
                ranks = [r["rank"] for r in siblings if r.get("rank") is not None]
                if node["role"] == "assistant" and len(siblings) > 1 and ranks:
                    n_branches += 1
                    assert node["rank"] == min(ranks) == 0
        assert n_branches > 50
    assert len(oasst_conversations(trees, best_only=False)) > len(oasst_conversations(trees))


def test_detection_and_single_row(trees):
    assert {detect_format(t) for t in trees} == {OASST}
    assert detect_format({"prompt": "p", "completion": "c"}) == PROMPT_COMPLETION
    ex = validate_record(trees[0])
    first = oasst_conversations(trees[:1])[0]
    assert ex.fmt == OASST and ex.messages == first.row["messages"]
    assert ex.message_field(1) == "prompt.replies[0]"


def test_tokenize_dataset_expands_trees_with_exact_masks(trees, smollm2_tokenizer):
    tok = smollm2_tokenizer
    convs = oasst_conversations(trees[:40], best_only=False)
    outs = tokenize_dataset(trees[:40], tok, max_length=None, progress=False, oasst_best_only=False)
    assert len(outs) == len(convs)
    for conv, out in zip(convs, outs):
        ids, mask = reference(tok, conv.row["messages"], SMOL_GENERATION_TEMPLATE)
        assert out["input_ids"] == ids
        assert [int(lab != IGNORE_INDEX) for lab in out["labels"]] == mask
    assert tokenize_record(trees[0], tok, max_length=None) == outs[0]


def tree(**root):
    node = {"role": "prompter", "text": "q", "replies": [
        {"role": "assistant", "text": "a", "rank": 0, "replies": []}]}
    node.update(root)
    return {"message_tree_id": "t", "prompt": node}


BAD_TREES = [
    (tree(text=""), "prompt.text", ["empty"]),
    (tree(text=5), "prompt.text", ["must be a string"]),
    (tree(replies=[{"role": "assistant", "rank": 0, "replies": []}]), "prompt.replies[0].text", ["missing"]),
    (tree(replies=[{"role": "bot", "text": "a", "replies": []}]), "prompt.replies[0].role", ["unknown role 'bot'"]),
    (tree(replies=[{"role": "prompter", "text": "a", "replies": []}]), "prompt.replies[0].role", ["other side"]),
    (tree(replies=["a"]), "prompt.replies[0]", ["expected a message node"]),
]


@pytest.mark.parametrize("row, field, words", BAD_TREES)
def test_bad_trees_name_file_row_field(tmp_path, smollm2_tokenizer, row, field, words):
    path = tmp_path / "trees.jsonl"
    path.write_text(json.dumps(tree()) + "\n" + json.dumps(row) + "\n")
    recs = load_records(path)
    with pytest.raises(DataError) as e:
        tokenize_dataset(recs, smollm2_tokenizer, progress=False)
    msg = str(e.value)
    assert "trees.jsonl line 2" in msg and f"field '{field}'" in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_deleted_and_prompter_leaves(tmp_path):
    row = tree(replies=[
        {"role": "assistant", "text": "gone", "rank": 0, "deleted": True, "replies": []},
        {"role": "assistant", "text": "kept", "rank": 1, "replies": [
            {"role": "prompter", "text": "follow-up without answer", "replies": []}]},
    ])
    (conv,) = oasst_conversations([row])
    assert conv.row["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "kept"}]
    with pytest.raises(DataError, match="no conversation with an assistant reply"):
        oasst_conversations([tree(replies=[])])
