"""``pronghorn export`` end to end: adapter re-export, and bad input answered with exit code 2 and no output."""

import pytest
import torch
from helpers import tiny_lora_model
from safetensors.torch import load_file

from pronghorn.cli import main
from pronghorn.export.adapter import save_adapter


@pytest.fixture(scope="module")
def adapter_dir(lora_smollm2, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "adapter"
    lora_smollm2[0].save_pretrained(path)
    return path


def test_export_lora_from_model_and_adapter(adapter_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", "--model", "default", "--adapter", str(adapter_dir), "--format", "lora",
                 "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    got = load_file(str(out / "adapter_model.safetensors"))
    want = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (out / "tokenizer.json").is_file()


def test_unknown_quant_fails_before_loading(tmp_path, capsys):
    assert main(["export", "--format", "gguf", "--quant", "q8_0", "q2_zz", "--out", str(tmp_path / "o")]) == 2
    assert "unknown GGUF quantization method 'q2_zz'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_adapter_for_another_base_model(tmp_path, capsys):
    save_adapter(tiny_lora_model(), tmp_path / "tiny_adapter")
    assert main(["export", "--adapter", str(tmp_path / "tiny_adapter"), "--format", "gguf",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.safetensors" in err and ("do not match" in err or "shape" in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_adapter"]
