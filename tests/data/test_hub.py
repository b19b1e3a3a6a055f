"""Hub dataset names: loaded with datasets.load_dataset; offline (or without datasets) a clear DataError."""

from __future__ import annotations

import sys

import pytest

from pronghorn.data import load_records
from pronghorn.errors import DataError

datasets = pytest.importorskip("datasets")


def test_hub_name_loads_through_datasets(monkeypatch):
    seen = {}

    def fake_load_dataset(name, subset=None, split=None):
        seen.update(name=name, subset=subset, split=split)
        return datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    recs = load_records("openai/gsm8k", split="test", subset="main")
    assert seen == {"name": "openai/gsm8k", "subset": "main", "split": "test"}
    assert [r.row for r in recs] == [{"text": "a"}, {"text": "b"}]
    assert recs[1].where == "openai/gsm8k[test] index 1 (0-based)"


def test_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_records("pronghorn-test/no-such-dataset")
    msg = str(e.value)
    assert msg.startswith("pronghorn-test/no-such-dataset: no such file or folder, and loading it as a Hugging "
                          "Face Hub dataset (split 'train') failed") and "Without a network" in msg


def test_without_datasets_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(DataError, match="install the 'datasets' package"):
        load_records("someone/some-set")
    with pytest.raises(DataError, match="no such file"):  # a missing dataset *file* is never looked up online
        load_records(str(tmp_path / "missing.jsonl"))
