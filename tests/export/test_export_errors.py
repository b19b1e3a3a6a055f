"""Bad input to the exporters: a clear PronghornError, and nothing (not even a temp dir) left on disk."""

import pytest
import torch

import pronghorn.export.gguf_writer as gguf_writer
from pronghorn.errors import OutputExistsError, PronghornError


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def test_unknown_quantization(lora_smollm2, tmp_path):
    model, tok = lora_smollm2
    with pytest.raises(PronghornError, match="unknown GGUF quantization method 'q9_k'"):
        model.save_pretrained_gguf(tmp_path / "out", tok, quantization_method=["f16", "q9_k"])
    assert _leftovers(tmp_path) == []


def test_unknown_save_method_and_missing_tokenizer(lora_smollm2, tmp_path):
    model, tok = lora_smollm2
    with pytest.raises(PronghornError, match="unknown save_method 'merged_8bit'"):
        model.save_pretrained_merged(tmp_path / "out", tok, save_method="merged_8bit")
    with pytest.raises(PronghornError, match="needs the tokenizer"):
        model.save_pretrained_merged(tmp_path / "out", None)
    with pytest.raises(PronghornError, match="needs the tokenizer"):
        model.save_pretrained_gguf(tmp_path / "out", None)
    assert _leftovers(tmp_path) == []


def test_output_dir_not_empty(lora_smollm2, tmp_path):
    model, tok = lora_smollm2
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite"):
        model.save_pretrained_merged(out, tok)
    with pytest.raises(OutputExistsError, match="overwrite"):
        model.save_pretrained_gguf(out, tok, "q8_0")
    assert _leftovers(tmp_path) == ["out"] and _leftovers(out) == ["notes.txt"]


def test_failure_midway_leaves_nothing(lora_smollm2, tmp_path, monkeypatch):
    model, tok = lora_smollm2
    real, calls = gguf_writer.encode, []

    def failing(array, kind):
        calls.append(kind)
        if len(calls) == 20:
            raise OSError("disk full")
        return real(array, kind)

    monkeypatch.setattr(gguf_writer, "encode", failing)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained_gguf(tmp_path / "out", tok, "f16")
    assert _leftovers(tmp_path) == []


def test_tokenizer_larger_than_the_embedding(tmp_path, tiny_tokenizer):
    from helpers import make_pair

    _, model = make_pair("smollm2_tied")
    tiny_tokenizer.add_tokens([f"tok{i}" for i in range(80)])
    with pytest.raises(PronghornError, match="tokenizer has 115 tokens but the model's embedding has 97 rows"):
        gguf_writer.save_gguf(model, tmp_path / "out", tiny_tokenizer, "f16")
    assert _leftovers(tmp_path) == []


def test_bad_shard_size(lora_smollm2, tmp_path):
    model, tok = lora_smollm2
    with pytest.raises(PronghornError, match="max_shard_size 'lots'"):
        model.save_pretrained_merged(tmp_path / "out", tok, max_shard_size="lots")
    assert _leftovers(tmp_path) == []
    assert torch.is_grad_enabled()
