"""load_records: .json / .jsonl parsing, provenance per row, and errors that name file and row."""

from __future__ import annotations

import json

import pytest

from pronghorn.data import Record, load_records, records_from_rows
from pronghorn.errors import DataError


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_real_file_keeps_1_based_lines(data_dir):
    recs = load_records(data_dir / "llamafactory-demo" / "c4_demo.jsonl")
    assert len(recs) == 300
    assert all(isinstance(r, Record) and r.kind == "line" for r in recs)
    assert [r.index for r in recs[:3]] == [1, 2, 3]
    assert recs[0].source.endswith("c4_demo.jsonl") and "line 1" in recs[0].where
    assert set(recs[0].row) == {"text"}


def test_json_real_file_keeps_0_based_indices(data_dir):
    recs = load_records(data_dir / "llamafactory-demo" / "kto_en_demo.json")
    assert len(recs) == 300
    assert [r.index for r in recs[:2]] == [0, 1] and recs[0].kind == "index"
    assert recs[5].where.endswith("kto_en_demo.json index 5 (0-based)")
    assert recs[0].row["messages"][0]["role"] == "user"


def test_json_data_wrapper(tmp_path):
    p = _write(tmp_path / "wrapped.json", json.dumps({"data": [{"text": "a"}, {"text": "b"}]}))
    recs = load_records(p)
    assert [r.row["text"] for r in recs] == ["a", "b"] and recs[1].index == 1


def test_jsonl_blank_lines_skipped_line_numbers_kept(tmp_path):
    p = _write(tmp_path / "gaps.jsonl", '{"text": "a"}\n\n   \n{"text": "b"}\n\n')
    recs = load_records(p)
    assert [(r.index, r.row["text"]) for r in recs] == [(1, "a"), (4, "b")]


def test_utf8_bom_accepted(tmp_path):
    p = tmp_path / "bom.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": "x"}]).encode())
    assert load_records(p)[0].row == {"text": "x"}


def test_records_from_rows():
    recs = records_from_rows([{"text": "a"}, {"text": "b"}], source="mem")
    assert recs[1].where == "mem index 1 (0-based)"
    with pytest.raises(DataError, match="empty"):
        records_from_rows([], source="mem")


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("bad.jsonl", '{"text": "a"}\n{"text": "b"\n', ["bad.jsonl", "line 2", "invalid JSON"]),
        ("bad.json", '[\n {"text": "a"},\n {"text": }\n]', ["bad.json", "line 3", "invalid JSON"]),
        ("rows.jsonl", '{"text": "a"}\n["not", "an", "object"]\n', ["rows.jsonl", "line 2", "JSON object", "array"]),
        ("rows.json", '[{"text": "a"}, "just a string"]', ["rows.json", "index 1 (0-based)", "JSON object", "string"]),
        ("empty.json", "[]", ["empty.json", "empty"]),
        ("empty2.json", '{"data": []}', ["empty2.json", "empty"]),
        ("blank.jsonl", "\n  \n\n", ["blank.jsonl", "empty"]),
        ("nodata.json", '{"rows": []}', ["nodata.json", "'data'"]),
        ("scalar.json", "42", ["scalar.json", "list"]),
        ("data.xml", "<a/>\n", ["data.xml", ".xml", "unsupported"]),
    ],
)
def test_bad_files(tmp_path, name, text, expected):
    p = _write(tmp_path / name, text)
    with pytest.raises(DataError) as e:
        load_records(p)
    for part in expected:
        assert part in str(e.value), (part, str(e.value))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_records(tmp_path / "nope.jsonl")
