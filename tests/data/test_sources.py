"""Sources beyond JSON/JSONL: CSV, Parquet (pyarrow), .txt, folders, datasets.Dataset objects."""

from __future__ import annotations

import csv
import json
import sys
import types

import pytest

from pronghorn.data import (
    ALPACA,
    IGNORE_INDEX,
    TEXT,
    detect_format,
    load_records,
    tokenize_dataset,
)
from pronghorn.errors import DataError


def test_txt_one_document_per_line(data_dir, smollm2_tokenizer):
    path = data_dir / "llamafactory-demo" / "wiki_demo.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    recs = load_records(path)
    expected = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    assert [(r.index, r.row["text"]) for r in recs] == expected
    assert recs[0].where.endswith("wiki_demo.txt line 1") and {detect_format(r) for r in recs} == {TEXT}
    outs = tokenize_dataset(recs[:5], smollm2_tokenizer, max_length=None, progress=False)
    for rec, out in zip(recs, outs):
        assert out["input_ids"] == smollm2_tokenizer(rec.row["text"])["input_ids"] + [smollm2_tokenizer.eos_token_id]
        assert out["labels"] == out["input_ids"]


def test_txt_blank_lines_skipped(tmp_path):
    (tmp_path / "d.txt").write_text("first doc\n\n  \nsecond doc\n")
    assert [(r.index, r.row) for r in load_records(tmp_path / "d.txt")] == [(1, {"text": "first doc"}),
                                                                             (4, {"text": "second doc"})]


def test_csv_alpaca_matches_json(data_dir, tmp_path, smollm2_tokenizer):
    src = data_dir / "llamafactory-demo" / "alpaca_en_demo.json"
    rows = json.loads(src.read_text())[:40]
    path = tmp_path / "alpaca.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows)
    recs = load_records(path)
    assert [r.row for r in recs] == rows  # empty inputs stay "" (not NaN), multi-line cells intact
    assert recs[0].index == 2 and recs[0].kind == "line"
    # each row's line is where it starts in the file
    text_lines = path.read_text(encoding="utf-8").splitlines()
    for r in recs:
        first = r.row["instruction"].splitlines()[0][:20]
        assert text_lines[r.index - 1].lstrip('"').replace('""', '"').startswith(first), r.where
    assert {detect_format(r) for r in recs} == {ALPACA}
    assert tokenize_dataset(recs, smollm2_tokenizer, progress=False) == tokenize_dataset(
        load_records(src)[:40], smollm2_tokenizer, progress=False)


@pytest.mark.parametrize(
    "text, words",
    [
        ('prompt,completion\n"a","b"\n"c","d","e"\n', ["bad.csv line 3", "expected 2 CSV fields"]),
        ("prompt,,completion\na,b,c\n", ["bad.csv line 1", "empty column name"]),
        ("text,text\na,b\n", ["bad.csv line 1", "repeats column", "'text'"]),
        ("prompt,completion\n", ["bad.csv", "empty"]),
    ],
)
def test_bad_csv(tmp_path, text, words):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DataError) as e:
        load_records(tmp_path / "bad.csv")
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_csv_bad_row_named_by_line(tmp_path, smollm2_tokenizer):
    (tmp_path / "pc.csv").write_text('prompt,completion\n"multi\nline prompt"," ok"\nq,\n')
    with pytest.raises(DataError, match=r"pc\.csv line 4: field 'completion': is empty"):
        tokenize_dataset(load_records(tmp_path / "pc.csv"), smollm2_tokenizer, progress=False)


def test_folder(tmp_path, data_dir):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    (tmp_path / "b" / "c.txt").write_text("two\nthree\n")
    (tmp_path / "b" / "d.csv").write_text("text\nfour\n")
    (tmp_path / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
    (tmp_path / "notes.md").write_text("ignored")
    recs = load_records(tmp_path)
    assert [r.row["text"] for r in recs] == ["one", "two", "three", "four"]
    assert recs[2].where == f"{tmp_path / 'b' / 'c.txt'} line 2"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no dataset file"):
        load_records(tmp_path / "empty")
    assert len(load_records(data_dir / "oasst")) == 100


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"d\.parquet: reading Parquet files needs the 'pyarrow' package"):
        load_records(path)


def test_parquet_with_pyarrow(tmp_path, monkeypatch):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # stand in for pyarrow's reader so the row plumbing is still checked
        table = types.SimpleNamespace(to_pylist=lambda: [{"text": "a"}, {"text": "b"}])
        fake = types.ModuleType("pyarrow.parquet")
        fake.read_table = lambda p: table
        monkeypatch.setitem(sys.modules, "pyarrow", types.ModuleType("pyarrow"))
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", fake)
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
    else:
        pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": "b"}]), tmp_path / "d.parquet")
    recs = load_records(tmp_path / "d.parquet")
    assert [(r.row, r.where) for r in recs][1] == ({"text": "b"}, f"{tmp_path / 'd.parquet'} index 1 (0-based)")


def test_datasets_dataset(monkeypatch, smollm2_tokenizer):
    class Dataset:  # the part of datasets.Dataset that load_records relies on: iteration of dict rows
        info = types.SimpleNamespace(dataset_name="demo")

        def __init__(self, rows):
            self.rows = rows

        def __iter__(self):
            return iter(self.rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(Dataset=Dataset, IterableDataset=None))
    ds = Dataset([{"prompt": "p", "completion": " c"}, {"prompt": "q", "completion": ""}])
    recs = load_records(ds)
    assert recs[0].row == {"prompt": "p", "completion": " c"}
    assert recs[1].where == "<datasets Dataset demo> index 1 (0-based)"
    with pytest.raises(DataError, match=r"<datasets Dataset demo> index 1 \(0-based\): field 'completion': is empty"):
        tokenize_dataset(recs, smollm2_tokenizer, progress=False)
    out = tokenize_dataset(recs[:1], smollm2_tokenizer, progress=False)[0]
    assert out["labels"][0] == IGNORE_INDEX
    with pytest.raises(TypeError, match="expects a path"):
        load_records(42)
