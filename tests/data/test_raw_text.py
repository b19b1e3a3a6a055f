"""Raw text for continued pretraining: documents -> EOS-separated token stream -> max_length blocks whose
positions restart at every document (and block) start, the label there masked. (The model-level checks, a
block's logits against each document run alone, are in tests/train/test_continued_pretraining.py.)"""

from __future__ import annotations

import json

import pytest

from helpers import make_tiny_tokenizer
from pronghorn.data import IGNORE_INDEX, detect_format, load_records, tokenize_dataset
from pronghorn.data.raw_text import raw_text_blocks
from pronghorn.errors import DataError

DOCS = ["The quick brown fox jumps over the lazy dog near the river bank.",
        "Continued pretraining teaches a model a new domain.",
        "Short one.",
        "A fourth document, long enough to be cut across two blocks of sixteen tokens each, and then some more."]


def _pieces(blocks):
    """(block, start, end) of every sequence of every block: where its positions restart at 0."""
    out = []
    for b, block in enumerate(blocks):
        starts = [i for i, p in enumerate(block["position_ids"]) if p == 0] + [len(block["position_ids"])]
        out += [(b, s, e) for s, e in zip(starts, starts[1:])]
    return out


def test_blocks_are_the_eos_separated_stream_cut_at_max_length(smollm2_tokenizer):
    tok = smollm2_tokenizer
    blocks, stats = raw_text_blocks(DOCS, tok, 16, progress=False, return_stats=True)
    stream = [t for d in DOCS for t in tok(d).input_ids + [tok.eos_token_id]]
    assert [t for b in blocks for t in b["input_ids"]] == stream
    assert all(len(b["input_ids"]) == 16 for b in blocks[:-1]) and 0 < len(blocks[-1]["input_ids"]) <= 16
    assert stats["documents"] == 4 and stats["blocks"] == len(blocks) == -(-len(stream) // 16)
    # positions restart where a document starts and where a block starts; labels are the ids except there
    doc_starts, at = set(), 0
    for d in DOCS:
        doc_starts.add(at)
        at += len(tok(d).input_ids) + 1
    flat = [(b, i) for b, block in enumerate(blocks) for i in range(len(block["input_ids"]))]
    expected_position = 0
    for k, (b, i) in enumerate(flat):
        if k in doc_starts or i == 0:
            expected_position = 0
        assert blocks[b]["position_ids"][i] == expected_position, (b, i)
        label = blocks[b]["labels"][i]
        assert label == (IGNORE_INDEX if expected_position == 0 else blocks[b]["input_ids"][i]), (b, i)
        expected_position += 1
    # each document's EOS closes a sequence: the token before every document start (and the stream's end) is EOS
    assert all(stream[s - 1] == tok.eos_token_id for s in doc_starts if s) and stream[-1] == tok.eos_token_id
    continued = sum(1 for b in range(1, len(blocks)) if 16 * b not in doc_starts)  # a document cut by a block end
    assert len(_pieces(blocks)) == len(DOCS) + continued and continued >= 1


def test_bos_where_the_tokenizer_adds_one():
    from tokenizers import processors

    tok = make_tiny_tokenizer()
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                                         special_tokens=[("<|im_start|>", bos)])
    docs = ["the cat sat", "a dog ran far", "the end"]
    blocks = raw_text_blocks(docs, tok, 64, progress=False)
    assert len(blocks) == 1
    ids = blocks[0]["input_ids"]
    starts = [i for i, p in enumerate(blocks[0]["position_ids"]) if p == 0]
    assert len(starts) == 3 and all(ids[s] == bos for s in starts)
    assert all(ids[s - 1] == tok.eos_token_id for s in starts[1:]) and ids[-1] == tok.eos_token_id
    assert ids.count(bos) == 3 and ids.count(tok.eos_token_id) == 3


def test_raw_text_is_asked_for_never_detected_and_text_rows_still_truncate(smollm2_tokenizer):
    row = {"text": DOCS[3]}
    assert detect_format(row) == "text"
    (truncated,) = tokenize_dataset([row], smollm2_tokenizer, "text", 8, progress=False)
    (whole,) = tokenize_dataset([row], smollm2_tokenizer, "raw_text", 8, progress=False)
    assert len(truncated["input_ids"]) == 8
    assert whole["input_ids"] == smollm2_tokenizer(DOCS[3]).input_ids + [smollm2_tokenizer.eos_token_id]


@pytest.mark.parametrize("row,message", [
    ({"content": "no text"}, "held.jsonl line 2: field 'text': missing"),
    ({"text": 7}, "held.jsonl line 2: field 'text': must be a string, got number"),
    ({"text": "   "}, "held.jsonl line 2: field 'text': is empty"),
])
def test_bad_rows_name_the_file_line_and_field(tmp_path, smollm2_tokenizer, row, message):
    path = tmp_path / "held.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        raw_text_blocks(str(path), smollm2_tokenizer, 16, progress=False)


def test_text_files_a_document_per_line_paragraph_or_file(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text("one line\nsecond line\n\nnew paragraph\n")
    (folder / "b.txt").write_text("only line\n")
    (folder / "notes.md").write_text("not a dataset file\n")

    def texts(source, sample_by):
        return [(r.source.rsplit("/", 1)[-1], r.index, r.row["text"]) for r in load_records(source, sample_by=sample_by)]

    assert texts(folder, "line") == [("a.txt", 1, "one line"), ("a.txt", 2, "second line"),
                                     ("a.txt", 4, "new paragraph"), ("b.txt", 1, "only line")]
    assert texts(folder, "paragraph") == [("a.txt", 1, "one line\nsecond line"), ("a.txt", 4, "new paragraph"),
                                          ("b.txt", 1, "only line")]
    assert texts(str(folder / "*.txt"), "document") == [
        ("a.txt", 1, "one line\nsecond line\n\nnew paragraph\n"), ("b.txt", 1, "only line\n")]


def test_bad_text_sources_are_named(tmp_path, smollm2_tokenizer):
    with pytest.raises(DataError, match=r"nothing\*\.txt: the pattern matches no dataset file"):
        load_records(str(tmp_path / "nothing*.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.txt: the dataset is empty"):
        raw_text_blocks(str(tmp_path / "empty.txt"), smollm2_tokenizer, 16, sample_by="document", progress=False)
    with pytest.raises(ValueError, match="sample_by must be one of line, paragraph, document"):
        load_records(str(tmp_path / "empty.txt"), sample_by="page")
